//! Sector ciphers: a block cipher, a chaining mode and an IV generator, as a
//! LUKS header names them (`aes` + `xts-plain64`, `serpent` + `cbc-essiv:sha256`,
//! ...), built from RustCrypto's crates.
//!
//! Data is encrypted in 512-byte sectors. Each sector's IV comes from its sector
//! number: `plain` is the number's low 32 bits, little-endian; `plain64` all 64
//! bits, little-endian; `essiv` the 64-bit number encrypted (ECB) with a second
//! key, the hash of the data key. In XTS mode the IV is the tweak.

use super::hash::HashAlg;
use cipher::block_padding::NoPadding;
use cipher::consts::{U8, U16};
use cipher::crypto_common::InnerInit;
use cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockSizeUser, InnerIvInit, KeyInit,
    StreamCipher, StreamCipherCoreWrapper,
};

/// Bytes per encrypted sector, for LUKS and for legacy AES alike.
pub const SECTOR_SIZE: u64 = 512;

/// A block cipher with its key size, named as QEMU names it (`aes-256`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
    /// Serpent with a 128-bit key.
    Serpent128,
    /// Serpent with a 192-bit key.
    Serpent192,
    /// Serpent with a 256-bit key.
    Serpent256,
    /// Twofish with a 128-bit key.
    Twofish128,
    /// Twofish with a 192-bit key.
    Twofish192,
    /// Twofish with a 256-bit key.
    Twofish256,
    /// CAST-128 (CAST5) with a 128-bit key.
    Cast5_128,
}

impl CipherAlg {
    /// QEMU's name (`qemu-img info` prints it as `cipher-alg`).
    pub fn qemu_name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
            CipherAlg::Serpent128 => "serpent-128",
            CipherAlg::Serpent192 => "serpent-192",
            CipherAlg::Serpent256 => "serpent-256",
            CipherAlg::Twofish128 => "twofish-128",
            CipherAlg::Twofish192 => "twofish-192",
            CipherAlg::Twofish256 => "twofish-256",
            CipherAlg::Cast5_128 => "cast5-128",
        }
    }

    /// Key length in bytes.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128
            | CipherAlg::Serpent128
            | CipherAlg::Twofish128
            | CipherAlg::Cast5_128 => 16,
            CipherAlg::Aes192 | CipherAlg::Serpent192 | CipherAlg::Twofish192 => 24,
            CipherAlg::Aes256 | CipherAlg::Serpent256 | CipherAlg::Twofish256 => 32,
        }
    }

    /// Block length in bytes.
    pub fn block_len(self) -> usize {
        match self {
            CipherAlg::Cast5_128 => 8,
            _ => 16,
        }
    }

    /// The cipher family with a key of `key_len` bytes, as QEMU maps a LUKS
    /// `cipher-name` and key size to an algorithm.
    pub fn from_family(family: &str, key_len: usize) -> Option<CipherAlg> {
        Some(match (family, key_len) {
            ("aes", 16) => CipherAlg::Aes128,
            ("aes", 24) => CipherAlg::Aes192,
            ("aes", 32) => CipherAlg::Aes256,
            ("serpent", 16) => CipherAlg::Serpent128,
            ("serpent", 24) => CipherAlg::Serpent192,
            ("serpent", 32) => CipherAlg::Serpent256,
            ("twofish", 16) => CipherAlg::Twofish128,
            ("twofish", 24) => CipherAlg::Twofish192,
            ("twofish", 32) => CipherAlg::Twofish256,
            ("cast5", 16) => CipherAlg::Cast5_128,
            _ => return None,
        })
    }

    /// The family name LUKS stores (`aes`, `serpent`, `twofish`, `cast5`).
    pub fn family(self) -> &'static str {
        match self {
            CipherAlg::Aes128 | CipherAlg::Aes192 | CipherAlg::Aes256 => "aes",
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => "serpent",
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => "twofish",
            CipherAlg::Cast5_128 => "cast5",
        }
    }
}

/// A chaining mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Each block on its own; no IV.
    Ecb,
    /// Cipher block chaining, restarted with the IV at every sector.
    Cbc,
    /// XEX with ciphertext stealing: two keys, the IV is the tweak.
    Xts,
    /// Counter mode; the IV is the counter's first value (big-endian).
    Ctr,
}

impl Mode {
    /// Look up a mode name.
    pub fn from_name(s: &str) -> Option<Mode> {
        Some(match s {
            "ecb" => Mode::Ecb,
            "cbc" => Mode::Cbc,
            "xts" => Mode::Xts,
            "ctr" => Mode::Ctr,
            _ => return None,
        })
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ecb => "ecb",
            Mode::Cbc => "cbc",
            Mode::Xts => "xts",
            Mode::Ctr => "ctr",
        }
    }
}

/// How each sector's IV is made from its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGen {
    /// The low 32 bits, little-endian, zero-padded.
    Plain,
    /// All 64 bits, little-endian, zero-padded.
    Plain64,
    /// The 64-bit number encrypted with the hash of the key.
    Essiv,
}

impl IvGen {
    /// Look up a generator name.
    pub fn from_name(s: &str) -> Option<IvGen> {
        Some(match s {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            "essiv" => IvGen::Essiv,
            _ => return None,
        })
    }

    /// The name.
    pub fn name(self) -> &'static str {
        match self {
            IvGen::Plain => "plain",
            IvGen::Plain64 => "plain64",
            IvGen::Essiv => "essiv",
        }
    }
}

/// Everything needed to build a sector cipher from a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CipherSpec {
    /// The block cipher.
    pub alg: CipherAlg,
    /// The chaining mode.
    pub mode: Mode,
    /// The IV generator.
    pub ivgen: IvGen,
    /// ESSIV's hash (and so its cipher's key size); `None` for plain/plain64.
    pub ivgen_hash: Option<HashAlg>,
}

impl CipherSpec {
    /// Bytes of key the spec takes (twice the cipher's for XTS).
    pub fn key_len(&self) -> usize {
        match self.mode {
            Mode::Xts => self.alg.key_len().saturating_mul(2),
            _ => self.alg.key_len(),
        }
    }

    /// IV length: none for ECB, a block otherwise.
    pub fn iv_len(&self) -> usize {
        match self.mode {
            Mode::Ecb => 0,
            _ => self.alg.block_len(),
        }
    }

    /// The ESSIV cipher: the same family, keyed by the hash's digest, as QEMU
    /// picks it (`No ... cipher with key size N available` otherwise).
    pub fn essiv_cipher(&self) -> Result<CipherAlg, String> {
        let h = self
            .ivgen_hash
            .ok_or("Missing IV generator hash specification")?;
        CipherAlg::from_family(self.alg.family(), h.digest_len()).ok_or_else(|| {
            format!(
                "No {} cipher with key size {} available",
                self.alg.family().to_uppercase(),
                h.digest_len()
            )
        })
    }
}

/// One sector's worth of decryption (and encryption) in one mode.
trait SectorMode: Send + Sync {
    fn decrypt(&self, iv: &[u8], data: &mut [u8]);
    fn encrypt(&self, iv: &[u8], data: &mut [u8]);
}

/// One block's encryption (ESSIV's IV cipher).
trait BlockEnc: Send + Sync {
    fn encrypt(&self, data: &mut [u8]);
}

struct Xts<C: BlockCipher + BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16>>(
    xts_mode::Xts128<C>,
);

impl<C> SectorMode for Xts<C>
where
    C: BlockCipher + BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16> + Send + Sync,
{
    fn decrypt(&self, iv: &[u8], data: &mut [u8]) {
        let tweak = crate::bytes::array::<16>(iv, 0);
        // QEMU only encrypts whole 512-byte sectors, a multiple of the block.
        if data.len() >= 16 {
            self.0.decrypt_sector(data, tweak);
        }
    }

    fn encrypt(&self, iv: &[u8], data: &mut [u8]) {
        let tweak = crate::bytes::array::<16>(iv, 0);
        if data.len() >= 16 {
            self.0.encrypt_sector(data, tweak);
        }
    }
}

struct Cbc<C>(C);

impl<C> SectorMode for Cbc<C>
where
    C: BlockCipher + BlockDecrypt + BlockEncrypt + Clone + Send + Sync,
{
    fn decrypt(&self, iv: &[u8], data: &mut [u8]) {
        if let Ok(d) = cbc::Decryptor::<C>::inner_iv_slice_init(self.0.clone(), iv) {
            // Whole sectors are whole blocks: nothing for NoPadding to refuse.
            let _ = d.decrypt_padded_mut::<NoPadding>(data);
        }
    }

    fn encrypt(&self, iv: &[u8], data: &mut [u8]) {
        use cipher::BlockEncryptMut;
        if let Ok(e) = cbc::Encryptor::<C>::inner_iv_slice_init(self.0.clone(), iv) {
            let len = data.len();
            let _ = e.encrypt_padded_mut::<NoPadding>(data, len);
        }
    }
}

struct Ecb<C>(C);

impl<C> SectorMode for Ecb<C>
where
    C: BlockCipher + BlockDecrypt + BlockEncrypt + Clone + Send + Sync,
{
    fn decrypt(&self, _iv: &[u8], data: &mut [u8]) {
        let d = ecb::Decryptor::<C>::inner_init(self.0.clone());
        let _ = d.decrypt_padded_mut::<NoPadding>(data);
    }

    fn encrypt(&self, _iv: &[u8], data: &mut [u8]) {
        BlockEnc::encrypt(self, data);
    }
}

impl<C> BlockEnc for Ecb<C>
where
    C: BlockCipher + BlockEncrypt + Clone + Send + Sync,
{
    fn encrypt(&self, data: &mut [u8]) {
        use cipher::BlockEncryptMut;
        let e = ecb::Encryptor::<C>::inner_init(self.0.clone());
        let len = data.len();
        let _ = e.encrypt_padded_mut::<NoPadding>(data, len);
    }
}

struct Ctr16<C>(C);

impl<C> SectorMode for Ctr16<C>
where
    C: BlockCipher + BlockEncrypt + BlockSizeUser<BlockSize = U16> + Clone + Send + Sync,
{
    fn decrypt(&self, iv: &[u8], data: &mut [u8]) {
        let core =
            ctr::CtrCore::<C, ctr::flavors::Ctr128BE>::inner_iv_slice_init(self.0.clone(), iv);
        if let Ok(core) = core {
            StreamCipherCoreWrapper::from_core(core).apply_keystream(data);
        }
    }

    fn encrypt(&self, iv: &[u8], data: &mut [u8]) {
        // A keystream: the same operation both ways.
        self.decrypt(iv, data);
    }
}

struct Ctr8<C>(C);

impl<C> SectorMode for Ctr8<C>
where
    C: BlockCipher + BlockEncrypt + BlockSizeUser<BlockSize = U8> + Clone + Send + Sync,
{
    fn decrypt(&self, iv: &[u8], data: &mut [u8]) {
        let core =
            ctr::CtrCore::<C, ctr::flavors::Ctr64BE>::inner_iv_slice_init(self.0.clone(), iv);
        if let Ok(core) = core {
            StreamCipherCoreWrapper::from_core(core).apply_keystream(data);
        }
    }

    fn encrypt(&self, iv: &[u8], data: &mut [u8]) {
        // A keystream: the same operation both ways.
        self.decrypt(iv, data);
    }
}

fn key_err(alg: CipherAlg, len: usize) -> String {
    format!("{} does not take a {len}-byte key", alg.qemu_name())
}

fn new_cipher<C: KeyInit>(alg: CipherAlg, key: &[u8]) -> Result<C, String> {
    if key.len() != alg.key_len() {
        return Err(key_err(alg, key.len()));
    }
    C::new_from_slice(key).map_err(|_| key_err(alg, key.len()))
}

fn mode16<C>(alg: CipherAlg, mode: Mode, key: &[u8]) -> Result<Box<dyn SectorMode>, String>
where
    C: KeyInit
        + BlockCipher
        + BlockEncrypt
        + BlockDecrypt
        + BlockSizeUser<BlockSize = U16>
        + Clone
        + Send
        + Sync
        + 'static,
{
    Ok(match mode {
        Mode::Xts => {
            let half = key.len() / 2;
            let (k1, k2) = key.split_at(half);
            Box::new(Xts(xts_mode::Xts128::new(
                new_cipher::<C>(alg, k1)?,
                new_cipher::<C>(alg, k2)?,
            )))
        }
        Mode::Cbc => Box::new(Cbc(new_cipher::<C>(alg, key)?)),
        Mode::Ecb => Box::new(Ecb(new_cipher::<C>(alg, key)?)),
        Mode::Ctr => Box::new(Ctr16(new_cipher::<C>(alg, key)?)),
    })
}

fn mode8<C>(alg: CipherAlg, mode: Mode, key: &[u8]) -> Result<Box<dyn SectorMode>, String>
where
    C: KeyInit
        + BlockCipher
        + BlockEncrypt
        + BlockDecrypt
        + BlockSizeUser<BlockSize = U8>
        + Clone
        + Send
        + Sync
        + 'static,
{
    Ok(match mode {
        Mode::Xts => return Err("Unsupported cipher mode xts".into()),
        Mode::Cbc => Box::new(Cbc(new_cipher::<C>(alg, key)?)),
        Mode::Ecb => Box::new(Ecb(new_cipher::<C>(alg, key)?)),
        Mode::Ctr => Box::new(Ctr8(new_cipher::<C>(alg, key)?)),
    })
}

fn build_mode(alg: CipherAlg, mode: Mode, key: &[u8]) -> Result<Box<dyn SectorMode>, String> {
    match alg {
        CipherAlg::Aes128 => mode16::<aes::Aes128>(alg, mode, key),
        CipherAlg::Aes192 => mode16::<aes::Aes192>(alg, mode, key),
        CipherAlg::Aes256 => mode16::<aes::Aes256>(alg, mode, key),
        CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
            mode16::<serpent::Serpent>(alg, mode, key)
        }
        CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
            mode16::<twofish::Twofish>(alg, mode, key)
        }
        CipherAlg::Cast5_128 => mode8::<cast5::Cast5>(alg, mode, key),
    }
}

fn build_block_enc(alg: CipherAlg, key: &[u8]) -> Result<Box<dyn BlockEnc>, String> {
    Ok(match alg {
        CipherAlg::Aes128 => Box::new(Ecb(new_cipher::<aes::Aes128>(alg, key)?)),
        CipherAlg::Aes192 => Box::new(Ecb(new_cipher::<aes::Aes192>(alg, key)?)),
        CipherAlg::Aes256 => Box::new(Ecb(new_cipher::<aes::Aes256>(alg, key)?)),
        CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
            Box::new(Ecb(new_cipher::<serpent::Serpent>(alg, key)?))
        }
        CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
            Box::new(Ecb(new_cipher::<twofish::Twofish>(alg, key)?))
        }
        CipherAlg::Cast5_128 => Box::new(Ecb(new_cipher::<cast5::Cast5>(alg, key)?)),
    })
}

/// A keyed sector cipher: decrypts whole 512-byte sectors given the number of
/// the first one.
pub struct SectorCipher {
    spec: CipherSpec,
    mode: Box<dyn SectorMode>,
    essiv: Option<(Box<dyn BlockEnc>, usize)>,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("SectorCipher")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// Key a cipher for `spec`; `key` must be `spec.key_len()` bytes.
    pub fn new(spec: CipherSpec, key: &[u8]) -> Result<SectorCipher, String> {
        if key.len() != spec.key_len() {
            return Err(format!(
                "{}-{} takes a {}-byte key, not {}",
                spec.alg.qemu_name(),
                spec.mode.name(),
                spec.key_len(),
                key.len()
            ));
        }
        let mode = build_mode(spec.alg, spec.mode, key)?;
        let essiv = match spec.ivgen {
            IvGen::Essiv => {
                let ealg = spec.essiv_cipher()?;
                let h = spec.ivgen_hash.unwrap_or(HashAlg::Sha256);
                let salt = h.digest(&[key]);
                let k = crate::bytes::slice(&salt, 0, ealg.key_len());
                Some((build_block_enc(ealg, k)?, ealg.block_len()))
            }
            _ => None,
        };
        Ok(SectorCipher { spec, mode, essiv })
    }

    /// What this cipher is.
    pub fn spec(&self) -> CipherSpec {
        self.spec
    }

    /// The IV of sector `sector` (empty in ECB mode).
    pub fn iv(&self, sector: u64) -> Vec<u8> {
        let n = self.spec.iv_len();
        let mut iv = vec![0u8; n];
        let le = sector.to_le_bytes();
        match self.spec.ivgen {
            IvGen::Plain => {
                let low = crate::bytes::slice(&le, 0, 4.min(n));
                if let Some(d) = iv.get_mut(..low.len()) {
                    d.copy_from_slice(low);
                }
            }
            IvGen::Plain64 => {
                let b = crate::bytes::slice(&le, 0, 8.min(n));
                if let Some(d) = iv.get_mut(..b.len()) {
                    d.copy_from_slice(b);
                }
            }
            IvGen::Essiv => {
                if let Some((enc, block)) = &self.essiv {
                    let mut data = vec![0u8; *block];
                    let b = crate::bytes::slice(&le, 0, 8.min(*block));
                    if let Some(d) = data.get_mut(..b.len()) {
                        d.copy_from_slice(b);
                    }
                    enc.encrypt(&mut data);
                    let m = n.min(data.len());
                    if let (Some(d), Some(s)) = (iv.get_mut(..m), data.get(..m)) {
                        d.copy_from_slice(s);
                    }
                }
            }
        }
        iv
    }

    /// Decrypt `data` in place: whole sectors, the first numbered `first_sector`.
    /// A short tail (never produced by QEMU) is left as it is.
    pub fn decrypt_sectors(&self, first_sector: u64, data: &mut [u8]) {
        for (i, sector) in data.chunks_exact_mut(SECTOR_SIZE as usize).enumerate() {
            let iv = self.iv(first_sector.wrapping_add(i as u64));
            self.mode.decrypt(&iv, sector);
        }
    }

    /// Encrypt `data` in place, as [`SectorCipher::decrypt_sectors`] undoes:
    /// whole sectors, the first numbered `first_sector`; a short tail is left
    /// as it is.
    pub fn encrypt_sectors(&self, first_sector: u64, data: &mut [u8]) {
        for (i, sector) in data.chunks_exact_mut(SECTOR_SIZE as usize).enumerate() {
            let iv = self.iv(first_sector.wrapping_add(i as u64));
            self.mode.encrypt(&iv, sector);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(alg: CipherAlg, mode: Mode, ivgen: IvGen) -> CipherSpec {
        CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash: Some(HashAlg::Sha256),
        }
    }

    #[test]
    fn plain_ivs_are_little_endian_sector_numbers() {
        let k = [1u8; 64];
        let c = SectorCipher::new(spec(CipherAlg::Aes256, Mode::Xts, IvGen::Plain64), &k)
            .unwrap_or_else(|e| panic!("{e}"));
        let iv = c.iv(0x1_0000_0002);
        assert_eq!(iv.get(..8), Some(&[2u8, 0, 0, 0, 1, 0, 0, 0][..]));
        assert!(iv.get(8..).is_some_and(|r| r.iter().all(|&b| b == 0)));
        let c = SectorCipher::new(spec(CipherAlg::Aes256, Mode::Xts, IvGen::Plain), &k)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.iv(0x1_0000_0002).get(..8),
            Some(&[2u8, 0, 0, 0, 0, 0, 0, 0][..])
        );
    }

    #[test]
    fn every_mode_decrypts_what_it_encrypts() {
        let algs = [
            CipherAlg::Aes128,
            CipherAlg::Aes256,
            CipherAlg::Serpent256,
            CipherAlg::Twofish128,
            CipherAlg::Cast5_128,
        ];
        let plain: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
        for alg in algs {
            for mode in [Mode::Xts, Mode::Cbc, Mode::Ecb, Mode::Ctr] {
                for ivgen in [IvGen::Plain, IvGen::Plain64, IvGen::Essiv] {
                    let s = spec(alg, mode, ivgen);
                    let key = vec![0x5au8; s.key_len()];
                    let Ok(c) = SectorCipher::new(s, &key) else {
                        continue;
                    };
                    let mut d = plain.clone();
                    c.encrypt_sectors(9, &mut d);
                    assert_ne!(d, plain, "{s:?} changes the bytes");
                    c.decrypt_sectors(9, &mut d);
                    assert_eq!(d, plain, "{s:?} round trip");
                }
            }
        }
    }

    #[test]
    fn key_sizes_are_checked_and_xts_refused_for_cast5() {
        assert!(
            SectorCipher::new(spec(CipherAlg::Aes128, Mode::Cbc, IvGen::Plain64), &[0; 15])
                .is_err()
        );
        assert!(
            SectorCipher::new(
                spec(CipherAlg::Cast5_128, Mode::Xts, IvGen::Plain64),
                &[0; 32]
            )
            .is_err()
        );
        assert!(
            SectorCipher::new(
                spec(CipherAlg::Cast5_128, Mode::Cbc, IvGen::Plain64),
                &[0; 16]
            )
            .is_ok()
        );
        let e = CipherSpec {
            ivgen_hash: Some(HashAlg::Sha1),
            ..spec(CipherAlg::Aes256, Mode::Cbc, IvGen::Essiv)
        };
        assert_eq!(
            e.essiv_cipher(),
            Err("No AES cipher with key size 20 available".to_string())
        );
    }
}
