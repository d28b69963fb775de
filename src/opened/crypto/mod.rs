//! Encrypted qcow2 images: the LUKS header, key slots, and decrypting guest data.
//!
//! qcow2 encrypts only guest data clusters; the header, L1/L2 tables, refcounts
//! and snapshot table stay in the clear, which is why `map` and `check` work
//! without a key. Two methods exist (header field `crypt_method`):
//!
//! * **1, legacy AES** (`encryption=on`, `encrypt.format=aes`): AES-128-CBC, the
//!   key being the passphrase's first 16 bytes (zero-padded), each 512-byte
//!   sector's IV its *guest* sector number (`plain64`). Nothing records whether a
//!   passphrase is right: a wrong one decrypts to noise, in QEMU as here.
//! * **2, LUKS** (`encrypt.format=luks`): a LUKS1 header in the file (see
//!   [`luks`]) holds up to 8 passphrase-protected copies of a random master key;
//!   the cipher, mode and IV generator are the header's, and each sector's IV is
//!   its *host* sector number, the byte offset in the image file divided by 512.
//!
//! Compressed clusters are never encrypted (QEMU reads them without the cipher).
//! The key is kept in the opened image ([`crate::image::Qcow2::set_data_key`]);
//! [`decrypted_segments`] is where guest reads pass through it.

pub mod cipher;
pub mod hash;
pub mod luks;

use crate::error::{Error, Result};
use crate::header::{CryptMethod, ExtensionKind, Field};
use crate::image::Qcow2;
use crate::io::Source;
use crate::lookup::Segment;
use crate::types::{GuestOffset, HostOffset};
use cipher::{CipherAlg, CipherSpec, IvGen, Mode, SECTOR_SIZE, SectorCipher};
pub use luks::{LuksHeader, UnlockError};

/// Which kind of key decrypts an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum KeySource {
    /// The LUKS master key, opened from this key slot.
    Luks {
        /// The key slot (0..8) the passphrase opened.
        slot: usize,
    },
    /// The legacy AES key made from the passphrase itself.
    LegacyAes,
}

impl KeySource {
    /// Which offset's sector numbers this kind of key's IVs count.
    pub fn iv_from(self) -> IvFrom {
        match self {
            KeySource::Luks { .. } => IvFrom::Host,
            KeySource::LegacyAes => IvFrom::Guest,
        }
    }
}

/// Which offset's sector number becomes a 512-byte sector's IV: LUKS counts
/// the sectors of the image file (the host offset), legacy AES those of the
/// guest disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvFrom {
    /// The host offset, for LUKS.
    Host,
    /// The guest offset, for legacy AES.
    Guest,
}

impl IvFrom {
    /// The rule of an image encrypted with `method` (`None` when it is not).
    pub fn of(method: CryptMethod) -> Option<IvFrom> {
        match method {
            CryptMethod::Aes => Some(KeySource::LegacyAes.iv_from()),
            CryptMethod::Luks => Some(KeySource::Luks { slot: 0 }.iv_from()),
            CryptMethod::None | CryptMethod::Unknown(_) => None,
        }
    }

    /// "host" or "guest".
    pub fn name(self) -> &'static str {
        match self {
            IvFrom::Host => "host",
            IvFrom::Guest => "guest",
        }
    }

    /// The IV's sector number for the byte at `host` (file offset) = `guest`.
    pub fn sector(self, host: HostOffset, guest: GuestOffset) -> u64 {
        match self {
            IvFrom::Host => host.get() / SECTOR_SIZE,
            IvFrom::Guest => guest.get() / SECTOR_SIZE,
        }
    }
}

/// The key that decrypts an image's data clusters.
#[derive(Clone)]
pub struct DataKey {
    /// Shared by the copies a simulation makes for its simulated image.
    cipher: std::sync::Arc<SectorCipher>,
    source: KeySource,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKey")
            .field("source", &self.source)
            .field("cipher", &self.cipher)
            .finish()
    }
}

/// The LUKS header the crypto extension points at, if the image has one.
pub fn luks_header(img: &Qcow2) -> Option<Result<LuksHeader>> {
    img.extensions.iter().find_map(|e| match e.kind {
        ExtensionKind::Crypto { offset, length } => {
            Some(LuksHeader::read(img.src.as_ref(), offset, length))
        }
        _ => None,
    })
}

/// The cipher legacy AES images use.
pub const LEGACY_AES: CipherSpec = CipherSpec {
    alg: CipherAlg::Aes128,
    mode: Mode::Cbc,
    ivgen: IvGen::Plain64,
    ivgen_hash: None,
};

impl DataKey {
    /// Open `img`'s key with `passphrase`: through the LUKS key slots, or (legacy
    /// AES) directly from the passphrase.
    pub fn unlock(img: &Qcow2, passphrase: &[u8]) -> std::result::Result<DataKey, UnlockError> {
        match img.header.crypt() {
            CryptMethod::Aes => {
                let mut key = zeroize::Zeroizing::new([0u8; 16]);
                let pass = crate::bytes::c_string(passphrase);
                for (k, p) in key.iter_mut().zip(pass) {
                    *k = *p;
                }
                let cipher = SectorCipher::new(LEGACY_AES, key.as_ref()).map_err(|e| {
                    Error::invalid("legacy AES key", HostOffset(Field::CryptMethod.offset()), e)
                })?;
                Ok(DataKey {
                    cipher: std::sync::Arc::new(cipher),
                    source: KeySource::LegacyAes,
                })
            }
            CryptMethod::Luks => {
                let h = match luks_header(img) {
                    Some(h) => h?,
                    None => {
                        return Err(Error::invalid(
                            "qcow2 header",
                            HostOffset(Field::CryptMethod.offset()),
                            "LUKS encryption without a full disk encryption header extension",
                        )
                        .into());
                    }
                };
                let spec = h.check()?;
                let mk = luks::unlock(&h, img.src.as_ref(), passphrase)?;
                let cipher = SectorCipher::new(spec, &mk.key)
                    .map_err(|e| Error::invalid("LUKS header", h.offset, e))?;
                Ok(DataKey {
                    cipher: std::sync::Arc::new(cipher),
                    source: KeySource::Luks { slot: mk.slot },
                })
            }
            CryptMethod::None | CryptMethod::Unknown(_) => Err(Error::Request(
                "the image is not encrypted (or uses an unknown method): no key to open".into(),
            )
            .into()),
        }
    }

    /// A LUKS-style aes-256-xts-plain64 key of fixed bytes, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests() -> DataKey {
        let spec = CipherSpec {
            alg: CipherAlg::Aes256,
            mode: Mode::Xts,
            ivgen: IvGen::Plain64,
            ivgen_hash: None,
        };
        match SectorCipher::new(spec, &[7u8; 64]) {
            Ok(c) => DataKey {
                cipher: std::sync::Arc::new(c),
                source: KeySource::Luks { slot: 0 },
            },
            Err(e) => panic!("{e}"),
        }
    }

    /// The cipher, as LUKS spells it (`aes-256-xts-plain64`).
    pub fn cipher_name(&self) -> String {
        spec_name(&self.cipher.spec())
    }

    /// Where the key came from.
    pub fn source(&self) -> KeySource {
        self.source
    }

    /// The cipher.
    pub fn spec(&self) -> CipherSpec {
        self.cipher.spec()
    }

    /// The sector number that becomes the IV for the byte at `host` (file
    /// offset) = `guest`: host-based for LUKS, guest-based for legacy AES.
    pub fn iv_sector(&self, host: HostOffset, guest: GuestOffset) -> u64 {
        self.source.iv_from().sector(host, guest)
    }

    /// The IV itself for that sector (empty in ECB mode).
    pub fn iv(&self, host: HostOffset, guest: GuestOffset) -> Vec<u8> {
        self.cipher.iv(self.iv_sector(host, guest))
    }

    /// Decrypt `data`, whole sectors read from `host` for guest offset `guest`
    /// (both sector-aligned).
    pub fn decrypt(&self, host: HostOffset, guest: GuestOffset, data: &mut [u8]) {
        self.cipher
            .decrypt_sectors(self.iv_sector(host, guest), data);
    }

    /// Encrypt `data`, whole sectors to be stored at `host` for guest offset
    /// `guest` (both sector-aligned), as QEMU writes guest data.
    pub fn encrypt(&self, host: HostOffset, guest: GuestOffset, data: &mut [u8]) {
        self.cipher
            .encrypt_sectors(self.iv_sector(host, guest), data);
    }
}

/// Bytes decrypted at a time.
const CHUNK: u64 = 1 << 20;

/// Feed `len` decrypted guest bytes, stored at `host` in `src` for guest offset
/// `guest`, to `f`: whole sectors are read (zeros past the end of the file, as
/// QEMU reads them), decrypted with the image's key into `buf`, and the
/// requested part handed on. Fails if no key was given.
pub fn decrypted_segments(
    img: &Qcow2,
    src: &dyn Source,
    host: HostOffset,
    guest: GuestOffset,
    len: u64,
    buf: &mut Vec<u8>,
    f: &mut dyn FnMut(Segment) -> Result<()>,
) -> Result<()> {
    let Some(key) = img.data_key() else {
        return Err(Error::unsupported(
            format!(
                "{}: encrypted data at guest offset {guest:#x}",
                img.src.name().display()
            ),
            "the image is encrypted and no passphrase was given to decrypt it",
        ));
    };
    let mut done = 0u64;
    while done < len {
        let h = host.saturating_add(done);
        let g = guest.saturating_add(done);
        // Clusters are at least 512 bytes, so host and guest share this.
        let skip = h.get() % SECTOR_SIZE;
        let (h, g) = (
            HostOffset(h.get().saturating_sub(skip)),
            GuestOffset(g.get().saturating_sub(skip)),
        );
        let want = len.saturating_sub(done).min(CHUNK);
        let total = skip
            .saturating_add(want)
            .div_ceil(SECTOR_SIZE)
            .saturating_mul(SECTOR_SIZE);
        // total <= CHUNK + 1024.
        buf.resize(total as usize, 0);
        crate::io::read_into(src, "encrypted guest data", h, buf)?;
        key.decrypt(h, g, buf);
        f(Segment::Bytes(crate::bytes::slice(
            buf,
            skip as usize,
            want as usize,
        )))?;
        done = done.saturating_add(want);
    }
    Ok(())
}

/// Where decryption enters one traced read.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DecryptStep {
    /// The cipher, as LUKS spells it (`aes-256-xts-plain64`).
    pub cipher: String,
    /// The sector number that becomes the IV.
    pub iv_sector: u64,
    /// Whether that number counts host (LUKS) or guest (legacy AES) sectors.
    pub iv_from: &'static str,
    /// The IV (hex; empty in ECB mode), when the key is known (ESSIV needs it).
    pub iv: Option<String>,
    /// The LUKS key slot the passphrase opened (`None`: legacy AES, or no key).
    pub key_slot: Option<usize>,
    /// Whether a key was given.
    pub key_given: bool,
}

fn spec_name(s: &CipherSpec) -> String {
    format!(
        "{}-{}-{}{}",
        s.alg.qemu_name(),
        s.mode.name(),
        s.ivgen.name(),
        s.ivgen_hash
            .map(|h| format!(":{}", h.name()))
            .unwrap_or_default()
    )
}

/// The decryption step of a trace for the byte at `host` (file offset) and
/// `guest`, with a sentence explaining it; `None` for an unencrypted image.
pub fn decrypt_step(
    img: &Qcow2,
    host: HostOffset,
    guest: GuestOffset,
) -> Option<(DecryptStep, String)> {
    let method = img.header.crypt();
    let iv_from = IvFrom::of(method)?;
    let spec = match method {
        CryptMethod::Aes => Some(LEGACY_AES),
        _ => img
            .data_key()
            .map(DataKey::spec)
            .or_else(|| luks_header(img).and_then(|h| h.ok()?.spec().ok())),
    };
    let cipher = spec
        .as_ref()
        .map(spec_name)
        .unwrap_or_else(|| "unknown (the LUKS header cannot be used)".into());
    let iv_sector = iv_from.sector(host, guest);
    let key = img.data_key();
    let key_slot = key.and_then(|k| match k.source {
        KeySource::Luks { slot } => Some(slot),
        KeySource::LegacyAes => None,
    });
    let iv = key.map(|k| {
        k.iv(host, guest)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    });
    let sector_start = iv_sector.saturating_mul(SECTOR_SIZE);
    let what = match iv_from {
        IvFrom::Host => format!("host offset {host:#x}"),
        IvFrom::Guest => format!("guest offset {guest:#x}"),
    };
    let key_text = match (key, key_slot) {
        (Some(_), Some(s)) => format!("with the master key from key slot {s}"),
        (Some(_), None) => "with the key made from the passphrase".to_string(),
        (None, _) => "but no passphrase was given, so the bytes cannot be read".to_string(),
    };
    let explanation = format!(
        "The cluster is encrypted ({cipher}): the 512-byte sector holding {what} starts at {sector_start:#x}, so sector {iv_sector} is the IV's number{}; it is decrypted {key_text}.",
        iv.as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| format!(" (IV {s})"))
            .unwrap_or_default()
    );
    Some((
        DecryptStep {
            cipher,
            iv_sector,
            iv_from: iv_from.name(),
            iv,
            key_slot,
            key_given: key.is_some(),
        },
        explanation,
    ))
}
