//! Passphrases for encrypted images, taken the way qemu-img takes them:
//! `--object secret,id=ID,data=TEXT|file=PATH[,format=raw|base64]` with
//! `--image-opts` and `encrypt.key-secret=ID`, or `--passphrase-file PATH`, or a
//! prompt (not echoed) when standard input is a terminal. Secrets are never
//! printed, logged or put in an error message.

use base64::Engine;
use color_eyre::eyre::{bail, eyre};
use qinspect::chain::Chain;
use qinspect::crypto::{DataKey, UnlockError};
use qinspect::image::Qcow2;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Options that give passphrases.
#[derive(clap::Args, Clone, Default)]
pub struct KeyArgs {
    /// Define a secret, as qemu-img does: `secret,id=ID,file=PATH` (the file's
    /// bytes, exactly) or `secret,id=ID,data=TEXT` (visible to other users:
    /// qinspect warns); add `format=base64` for base64-encoded contents.
    #[arg(
        long = "object",
        value_name = "secret,id=ID,file=PATH",
        help_heading = "Encryption"
    )]
    pub objects: Vec<String>,
    /// Read IMAGE as qemu-img's --image-opts: `driver=qcow2,file.filename=PATH,encrypt.key-secret=ID`
    /// (`backing.encrypt.key-secret=ID` for an encrypted backing file).
    #[arg(long, help_heading = "Encryption")]
    pub image_opts: bool,
    /// The top image's passphrase is the contents of this file (every byte, as
    /// with secret file=).
    #[arg(long, value_name = "PATH", help_heading = "Encryption")]
    pub passphrase_file: Option<PathBuf>,
}

impl std::fmt::Debug for KeyArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // --object may carry data=: never print it.
        f.debug_struct("KeyArgs")
            .field("objects", &self.objects.len())
            .field("image_opts", &self.image_opts)
            .field("passphrase_file", &self.passphrase_file)
            .finish()
    }
}

type Secret = Zeroizing<Vec<u8>>;

/// Ask for a passphrase on the terminal without echoing it. Echo is turned off
/// *before* the prompt is shown, so nothing typed after the prompt appears can be
/// echoed; the terminal's settings are restored afterwards, also on error.
fn prompt_hidden(prompt: &str) -> std::io::Result<Secret> {
    use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
    use std::io::{BufRead, Write};
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")?;
    let saved = tcgetattr(&tty)?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    quiet.local_modes.insert(LocalModes::ECHONL);
    tcsetattr(&tty, OptionalActions::Flush, &quiet)?;
    let read = (|| {
        let mut w = &tty;
        w.write_all(prompt.as_bytes())?;
        w.flush()?;
        let mut line = Zeroizing::new(Vec::new());
        std::io::BufReader::new(&tty).read_until(b'\n', &mut line)?;
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        Ok(line)
    })();
    tcsetattr(&tty, OptionalActions::Now, &saved)?;
    read
}

/// A passphrase kept for later (the viewer reopens images); wiped on drop and
/// never shown by `Debug`.
#[derive(Clone, Default)]
pub struct Passphrase(pub Option<Secret>);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Passphrase(given)"
        } else {
            "Passphrase(none)"
        })
    }
}

/// Give `img` its key from `pass`; a sentence saying what happened, for the
/// viewer (`None` when the image is not encrypted or no passphrase was given).
pub fn unlock_with(img: &Qcow2, pass: &Passphrase) -> Option<Result<String, String>> {
    if img.header.crypt_method == 0 {
        return None;
    }
    if let Some(k) = img.data_key() {
        return Some(Ok(describe_key(k)));
    }
    let p = pass.0.as_ref()?;
    Some(match DataKey::unlock(img, p) {
        Ok(k) => {
            let text = describe_key(&k);
            img.set_data_key(k);
            Ok(text)
        }
        Err(UnlockError::NoSlotMatches { .. }) => {
            Err("no key slot matches this passphrase".to_string())
        }
        Err(UnlockError::Header(e)) => Err(e.to_string()),
    })
}

fn describe_key(k: &DataKey) -> String {
    match k.source() {
        qinspect::crypto::KeySource::Luks { slot } => format!("unlocked with key slot {slot}"),
        qinspect::crypto::KeySource::LegacyAes => {
            "key made from the passphrase (legacy AES cannot tell a wrong one)".to_string()
        }
    }
}

/// Passphrases by layer depth (0 = top image).
#[derive(Default)]
pub struct Keys {
    by_depth: Vec<Option<Secret>>,
    /// `--passphrase-file`: for every encrypted layer without its own secret.
    default: Option<Secret>,
    /// Whether any way of giving a key was used.
    pub given: bool,
}

fn parse_opts(s: &str) -> Vec<(String, String)> {
    // QEMU's option syntax: comma-separated key=value, ",," for a literal comma.
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => out.push((p, String::new())),
        }
    }
    out
}

fn load_secret(spec: &str) -> color_eyre::Result<(String, Secret)> {
    let opts = parse_opts(spec);
    let mut it = opts.iter();
    match it.next() {
        Some((k, v)) if v.is_empty() && k == "secret" => {}
        Some((k, _)) if k == "qom-type" => {}
        _ => bail!("--object: only 'secret' objects are understood (secret,id=ID,file=PATH)"),
    }
    let (mut id, mut data, mut file, mut format) = (None, None, None, None);
    for (k, v) in it {
        match k.as_str() {
            "id" => id = Some(v.clone()),
            "data" => data = Some(Zeroizing::new(v.clone().into_bytes())),
            "file" => file = Some(PathBuf::from(v)),
            "format" => format = Some(v.clone()),
            "keyid" | "iv" => bail!(
                "--object secret: encrypted secrets (keyid=, iv=) are not supported; give the passphrase itself"
            ),
            "qom-type" => {}
            other => bail!("--object secret: unknown property '{other}'"),
        }
    }
    let id = id.ok_or_else(|| eyre!("--object secret: 'id' is required"))?;
    let raw = match (data, file) {
        (Some(_), Some(_)) => bail!("secret '{id}': 'data' and 'file' are mutually exclusive"),
        (None, None) => bail!("secret '{id}': either 'data' or 'file' is required"),
        (Some(d), None) => {
            super::warn(format_args!(
                "secret '{id}' is given with data=, which other users can see in the process list and shell history; prefer file=PATH"
            ));
            d
        }
        (None, Some(p)) => Zeroizing::new(
            std::fs::read(&p)
                .map_err(|e| eyre!("secret '{id}': cannot read {}: {e}", p.display()))?,
        ),
    };
    let secret = match format.as_deref() {
        None | Some("raw") => raw,
        Some("base64") => Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(raw.as_slice())
                .map_err(|_| eyre!("secret '{id}': the contents are not valid base64"))?,
        ),
        Some(f) => bail!("secret '{id}': unknown format '{f}' (raw or base64)"),
    };
    Ok((id, secret))
}

impl KeyArgs {
    /// Load the secrets; with `--image-opts`, also turn `image` from an option
    /// string into the file name it names.
    pub fn resolve(&self, image: &mut PathBuf) -> color_eyre::Result<Keys> {
        let mut secrets = Vec::new();
        for o in &self.objects {
            secrets.push(load_secret(o)?);
        }
        let mut keys = Keys {
            given: !secrets.is_empty() || self.passphrase_file.is_some(),
            ..Keys::default()
        };
        if self.image_opts {
            let spec = image.to_string_lossy().into_owned();
            let mut filename = None;
            for (k, v) in parse_opts(&spec) {
                if k == "file.filename" || k == "filename" {
                    filename = Some(PathBuf::from(v));
                } else if let Some(prefix) = k.strip_suffix("encrypt.key-secret") {
                    let depth = prefix.matches("backing.").count();
                    if prefix != "backing.".repeat(depth) {
                        bail!("--image-opts: unknown option '{k}'");
                    }
                    let Some((_, s)) = secrets.iter().find(|(id, _)| *id == v) else {
                        bail!("No secret with id '{v}'");
                    };
                    if keys.by_depth.len() <= depth {
                        keys.by_depth.resize(depth + 1, None);
                    }
                    keys.by_depth[depth] = Some(s.clone());
                } else if k == "driver" && v != "qcow2" {
                    bail!("--image-opts: qinspect opens driver=qcow2 images only");
                }
            }
            *image = filename.ok_or_else(|| {
                eyre!("--image-opts: the options name no file (file.filename=PATH)")
            })?;
        } else if !secrets.is_empty() {
            bail!(
                "--object secret needs --image-opts and encrypt.key-secret=ID to say which image it opens, as in qemu-img"
            );
        }
        if let Some(p) = &self.passphrase_file {
            keys.default = Some(Zeroizing::new(
                std::fs::read(p).map_err(|e| eyre!("cannot read {}: {e}", p.display()))?,
            ));
        }
        Ok(keys)
    }
}

impl Keys {
    /// The viewer's passphrase for the top image at `path`: the one given, or
    /// (when none was, the image is encrypted and standard input is a terminal)
    /// one typed at a prompt before the screen is taken over.
    pub fn into_viewer_passphrase(mut self, path: &Path) -> color_eyre::Result<Passphrase> {
        use std::io::IsTerminal;
        if let Some(p) = self.by_depth.get_mut(0).and_then(Option::take) {
            return Ok(Passphrase(Some(p)));
        }
        if let Some(p) = self.default.take() {
            return Ok(Passphrase(Some(p)));
        }
        if self.given || !std::io::stdin().is_terminal() {
            return Ok(Passphrase(None));
        }
        let mut head = [0u8; 36];
        let encrypted = std::fs::File::open(path)
            .and_then(|f| {
                use std::os::unix::fs::FileExt;
                f.read_exact_at(&mut head, 0)
            })
            .is_ok()
            && head[..4] == *b"QFI\xfb"
            && u32::from_be_bytes([head[32], head[33], head[34], head[35]]) != 0;
        if !encrypted {
            return Ok(Passphrase(None));
        }
        let p = prompt_hidden(&format!("Passphrase for {}: ", path.display()))?;
        Ok(Passphrase(Some(p)))
    }

    /// Open every encrypted layer that has a passphrase (prompting for the top
    /// one when none was given and standard input is a terminal). Fails, before
    /// anything is written, when a passphrase opens no key slot.
    pub fn unlock(mut self, chain: &Chain) -> color_eyre::Result<()> {
        for (depth, layer) in chain.layers.iter().enumerate() {
            if let Some(img) = layer.qcow2() {
                self.unlock_image(depth, img, &layer.path)?;
            }
        }
        Ok(())
    }

    /// Open one image at `depth` of its chain, as [`Keys::unlock`] does; `Ok(true)`
    /// when it is encrypted and now has its key.
    pub fn unlock_image(
        &mut self,
        depth: usize,
        img: &Qcow2,
        path: &Path,
    ) -> color_eyre::Result<bool> {
        use std::io::IsTerminal;
        if img.header.crypt_method == 0 {
            return Ok(false);
        }
        if img.data_key().is_some() {
            return Ok(true);
        }
        let mut pass = self
            .by_depth
            .get_mut(depth)
            .and_then(Option::take)
            .or_else(|| self.default.clone());
        if pass.is_none() && !self.given && std::io::stdin().is_terminal() {
            pass = Some(prompt_hidden(&format!(
                "Passphrase for {}: ",
                path.display()
            ))?);
        }
        let Some(pass) = pass else { return Ok(false) };
        match DataKey::unlock(img, &pass) {
            Ok(k) => {
                img.set_data_key(k);
                Ok(true)
            }
            Err(UnlockError::NoSlotMatches { tried }) => bail!(
                "{}: no key slot matches this passphrase (tried active key slots {}; if the passphrase is right, their key material is damaged); nothing was read",
                path.display(),
                tried
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(UnlockError::Header(e)) => Err(eyre!(e).wrap_err(format!(
                "{}: cannot open the encryption key",
                path.display()
            ))),
        }
    }
}

impl Keys {
    /// Fail, as qemu-img does when it opens the chain, if an encrypted layer
    /// has no key (before any output is written).
    pub fn require(chain: &Chain) -> color_eyre::Result<()> {
        for l in &chain.layers {
            if let Some(i) = l.qcow2()
                && i.header.crypt_method != 0
                && i.data_key().is_none()
            {
                bail!(
                    "{} is encrypted and no passphrase was given for it (qemu-img: Parameter 'encrypt.key-secret' is required for cipher); give it with --passphrase-file PATH, or --object secret,id=ID,file=PATH --image-opts driver=qcow2,file.filename=...,encrypt.key-secret=ID",
                    l.path.display()
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_strings_split_like_qemu() {
        let o = parse_opts("driver=qcow2,file.filename=a,,b.qcow2,encrypt.key-secret=s");
        assert_eq!(o[1], ("file.filename".to_string(), "a,b.qcow2".to_string()));
        assert_eq!(o[2].1, "s");
    }

    #[test]
    fn secrets_load_and_debug_never_shows_them() {
        let (id, s) = load_secret("secret,id=k,data=aGVsbG8=,format=base64").unwrap();
        assert_eq!((id.as_str(), s.as_slice()), ("k", &b"hello"[..]));
        assert!(load_secret("secret,id=k").is_err());
        assert!(load_secret("secret,id=k,data=a,file=/x").is_err());
        let a = KeyArgs {
            objects: vec!["secret,id=k,data=TOPSECRET".into()],
            ..Default::default()
        };
        assert!(!format!("{a:?}").contains("TOPSECRET"));
    }
}
