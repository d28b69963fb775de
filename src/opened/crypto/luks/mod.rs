//! The LUKS1 header QEMU writes inside a qcow2 image (`encrypt.format=luks`).
//!
//! The qcow2 header's `crypt_method` is 2, and the full-disk-encryption header
//! extension gives the offset and length of a region of the file holding a
//! standard LUKS1 header: 592 bytes of fields, then 8 key slots' worth of key
//! material. All integers are big-endian.
//!
//! ```text
//!   0 magic "LUKS\xba\xbe"   6 version (1)       8 cipher-name[32]   40 cipher-mode[32]
//!  72 hash-spec[32]         104 payload-offset  108 key-bytes       112 mk-digest[20]
//! 132 mk-digest-salt[32]    164 mk-digest-iter  168 uuid[40]
//! 208 + 48*i key slot i:    +0 active  +4 iterations  +8 salt[32]  +40 key-material offset  +44 stripes
//! ```
//!
//! To unlock: for each active slot, PBKDF2(passphrase, slot salt, slot
//! iterations) gives a key that decrypts the slot's key material (`key-bytes *
//! stripes` bytes, sectors numbered from 0); the anti-forensic merge turns the
//! stripes into a candidate master key; PBKDF2(candidate, mk-digest-salt,
//! mk-digest-iter) must equal mk-digest. The master key then decrypts guest data.
//! Inside qcow2 the payload offset is not used: data clusters sit wherever the
//! L2 tables say, and each sector's IV comes from its *host* offset.

use super::cipher::{CipherAlg, CipherSpec, IvGen, Mode, SECTOR_SIZE};
use super::hash::HashAlg;
use crate::bytes::{array, be16, be32, slice};
use crate::error::{Error, Result};
use crate::types::HostOffset;
use serde::Serialize;

mod unlock;
pub use unlock::{MasterKey, UnlockError, unlock};

/// "LUKS\xba\xbe".
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Bytes of header fields before the key material.
pub const HEADER_LEN: u64 = 592;
/// Key slots in a LUKS1 header.
pub const KEY_SLOTS: usize = 8;
/// The only stripe count QEMU accepts.
pub const STRIPES: u32 = 4000;
/// A key slot in use.
pub const SLOT_ENABLED: u32 = 0x00AC_71F3;
/// A key slot not in use.
pub const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// Where key material may start at the earliest (QEMU's key-slot offset).
pub const KEY_SLOT_OFFSET: u64 = 4096;
/// Length of the master-key digest.
pub const DIGEST_LEN: usize = 20;
/// Length of each salt.
pub const SALT_LEN: usize = 32;
/// The most PBKDF2 iterations qinspect runs for one key slot or digest (2^27,
/// about 134 million). QEMU has no such limit; a header asking for more (up to
/// 2^32-1, many minutes of work per slot) is refused, citing this limit, instead
/// of hanging. `qemu-img create` sizes the count to its `iter-time` (default 2
/// seconds of its own PBKDF2): about 10 million on the machine this was built
/// on, and qinspect's PBKDF2 is as fast, so real images stay far below it.
pub const MAX_ITERATIONS: u32 = 1 << 27;

/// One of the 8 key slots.
#[derive(Clone, Debug, Serialize)]
pub struct KeySlot {
    /// 0..8.
    pub index: usize,
    /// File offset of the slot's 48 bytes.
    pub offset: HostOffset,
    /// Raw `active` field: 0x00ac71f3 in use, 0x0000dead free.
    pub active_raw: u32,
    /// PBKDF2 iterations for the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt (hex).
    pub salt: String,
    /// Where the key material starts, in 512-byte sectors from the LUKS header.
    pub key_offset_sector: u32,
    /// How many stripes the master key was split into.
    pub stripes: u32,
    #[serde(skip)]
    salt_bytes: [u8; SALT_LEN],
}

impl KeySlot {
    /// True when `active` says the slot holds a key.
    pub fn active(&self) -> bool {
        self.active_raw == SLOT_ENABLED
    }

    /// Key-material offset in bytes from the start of the LUKS header.
    pub fn key_offset(&self) -> u64 {
        u64::from(self.key_offset_sector).saturating_mul(SECTOR_SIZE)
    }

    /// Bytes of key material (`key_bytes * stripes`).
    pub fn material_len(&self, key_bytes: u32) -> u64 {
        u64::from(key_bytes).saturating_mul(u64::from(self.stripes))
    }
}

/// A decoded LUKS1 header, exactly as stored (nothing validated yet: see
/// [`LuksHeader::check`]).
#[derive(Clone, Debug, Serialize)]
pub struct LuksHeader {
    /// File offset of the header (from the crypto header extension).
    pub offset: HostOffset,
    /// Length of the region the extension reserves.
    pub length: u64,
    /// The magic bytes (hex).
    pub magic: String,
    /// Format version (QEMU accepts 1).
    pub version: u16,
    /// Cipher family (`aes`, `serpent`, `twofish`, `cast5`).
    pub cipher_name: String,
    /// Mode and IV generator (`xts-plain64`, `cbc-essiv:sha256`, ...).
    pub cipher_mode: String,
    /// Hash for PBKDF2 and the anti-forensic splitter.
    pub hash_spec: String,
    /// Where the payload starts, in sectors (unused inside qcow2).
    pub payload_offset_sector: u32,
    /// Master key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key (hex).
    pub mk_digest: String,
    /// Salt for that digest (hex).
    pub mk_digest_salt: String,
    /// PBKDF2 iterations for that digest.
    pub mk_digest_iterations: u32,
    /// The volume UUID.
    pub uuid: String,
    /// The 8 key slots.
    pub slots: Vec<KeySlot>,
    #[serde(skip)]
    magic_bytes: [u8; 6],
    #[serde(skip)]
    mk_digest_bytes: [u8; DIGEST_LEN],
    #[serde(skip)]
    mk_salt_bytes: [u8; SALT_LEN],
    #[serde(skip)]
    terminated: [bool; 3],
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn cstr(b: &[u8]) -> (String, bool) {
    let name = crate::bytes::c_string(b);
    (crate::bytes::text(name), name.len() < b.len())
}

/// One header field for `dump`: where it is, its value and what it is for.
#[derive(Clone, Debug, Serialize)]
pub struct Field {
    /// Field name.
    pub name: String,
    /// File offset.
    pub offset: HostOffset,
    /// Length in bytes.
    pub len: u64,
    /// The value as text.
    pub value: String,
    /// What the field is for.
    pub meaning: String,
}

impl LuksHeader {
    /// Decode the 592 header bytes in `b`, found at file offset `offset` in a
    /// region of `length` bytes.
    pub fn parse(b: &[u8], offset: HostOffset, length: u64) -> LuksHeader {
        let (cipher_name, t0) = cstr(slice(b, 8, 32));
        let (cipher_mode, t1) = cstr(slice(b, 40, 32));
        let (hash_spec, t2) = cstr(slice(b, 72, 32));
        let slots = (0..KEY_SLOTS)
            .map(|i| {
                let at = 208usize.saturating_add(i.saturating_mul(48));
                let s = slice(b, at, 48);
                let salt_bytes = array::<SALT_LEN>(s, 8);
                KeySlot {
                    index: i,
                    offset: offset.saturating_add(at as u64),
                    active_raw: be32(s, 0),
                    iterations: be32(s, 4),
                    salt: hex(&salt_bytes),
                    key_offset_sector: be32(s, 40),
                    stripes: be32(s, 44),
                    salt_bytes,
                }
            })
            .collect();
        let magic_bytes = array::<6>(b, 0);
        let mk_digest_bytes = array::<DIGEST_LEN>(b, 112);
        let mk_salt_bytes = array::<SALT_LEN>(b, 132);
        LuksHeader {
            offset,
            length,
            magic: hex(&magic_bytes),
            version: be16(b, 6),
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset_sector: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest: hex(&mk_digest_bytes),
            mk_digest_salt: hex(&mk_salt_bytes),
            mk_digest_iterations: be32(b, 164),
            uuid: cstr(slice(b, 168, 40)).0,
            slots,
            magic_bytes,
            mk_digest_bytes,
            mk_salt_bytes,
            terminated: [t0, t1, t2],
        }
    }

    /// Read and decode the header at `offset` (`length` bytes reserved) in `src`.
    pub fn read(
        src: &dyn crate::io::Source,
        offset: HostOffset,
        length: u64,
    ) -> Result<LuksHeader> {
        let b = crate::io::read_exact(src, "LUKS header", offset, HEADER_LEN)?;
        Ok(LuksHeader::parse(&b, offset, length))
    }

    /// True when the magic is right.
    pub fn magic_ok(&self) -> bool {
        self.magic_bytes == MAGIC
    }

    /// Payload offset in bytes.
    pub fn payload_offset(&self) -> u64 {
        u64::from(self.payload_offset_sector).saturating_mul(SECTOR_SIZE)
    }

    /// Sectors a key slot's material occupies, rounded up to QEMU's 4 KiB.
    fn material_sectors(&self, slot: &KeySlot) -> u64 {
        let header_sectors = KEY_SLOT_OFFSET / SECTOR_SIZE;
        slot.material_len(self.key_bytes)
            .div_ceil(SECTOR_SIZE)
            .div_ceil(header_sectors)
            .saturating_mul(header_sectors)
    }

    fn bad(&self, field_off: u64, reason: impl Into<String>) -> Error {
        Error::invalid("LUKS header", self.offset.saturating_add(field_off), reason)
    }

    /// The checks QEMU makes when it opens the header
    /// (`qcrypto_block_luks_check_header` and `_parse_header`), in its order and
    /// words, plus the bounds qinspect needs to stay fast; returns the cipher.
    pub fn check(&self) -> Result<CipherSpec> {
        if !self.magic_ok() {
            return Err(self.bad(0, "Volume is not in LUKS format"));
        }
        if self.version != 1 {
            return Err(self.bad(6, format!("LUKS version {} is not supported", self.version)));
        }
        let names = ["cipher name", "cipher mode", "hash spec"];
        for (i, (t, n)) in self.terminated.iter().zip(names).enumerate() {
            if !t {
                let off = 8u64.saturating_add(32u64.saturating_mul(i as u64));
                return Err(self.bad(off, format!("LUKS header {n} is not NUL terminated")));
            }
        }
        let min_sectors = KEY_SLOT_OFFSET.div_ceil(SECTOR_SIZE);
        if u64::from(self.payload_offset_sector) < min_sectors {
            return Err(self.bad(104, "LUKS payload is overlapping with the header"));
        }
        if self.mk_digest_iterations == 0 {
            return Err(self.bad(164, "LUKS key iteration count is zero"));
        }
        for s in &self.slots {
            let rel = s.offset.saturating_sub(self.offset);
            let i = s.index;
            if s.stripes != STRIPES {
                return Err(self.bad(
                    rel.saturating_add(44),
                    format!(
                        "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                        s.stripes as i32
                    ),
                ));
            }
            if s.active_raw != SLOT_ENABLED && s.active_raw != SLOT_DISABLED {
                return Err(self.bad(
                    rel,
                    format!("Keyslot {i} state (active/disable) is corrupted"),
                ));
            }
            if s.active() && s.iterations == 0 {
                return Err(self.bad(
                    rel.saturating_add(4),
                    format!("Keyslot {i} iteration count is zero"),
                ));
            }
            let start = u64::from(s.key_offset_sector);
            let len = self.material_sectors(s);
            if start < min_sectors {
                return Err(self.bad(
                    rel.saturating_add(40),
                    format!("Keyslot {i} is overlapping with the LUKS header"),
                ));
            }
            if start.saturating_add(len) > u64::from(self.payload_offset_sector) {
                return Err(self.bad(
                    rel.saturating_add(40),
                    format!("Keyslot {i} is overlapping with the encrypted payload"),
                ));
            }
            for t in self.slots.iter().skip(i.saturating_add(1)) {
                let s2 = u64::from(t.key_offset_sector);
                let l2 = self.material_sectors(t);
                if start < s2.saturating_add(l2) && s2 < start.saturating_add(len) {
                    return Err(self.bad(
                        rel.saturating_add(40),
                        format!("Keyslots {i} and {} are overlapping in the header", t.index),
                    ));
                }
            }
        }
        self.spec()
    }

    /// Parse the cipher name, mode string and hashes into a cipher spec, as
    /// QEMU's name lookups do.
    pub fn spec(&self) -> Result<CipherSpec> {
        let Some((mode_name, ivgen_full)) = self.cipher_mode.split_once('-') else {
            return Err(self.bad(
                40,
                format!(
                    "Unexpected cipher mode string format '{}'",
                    self.cipher_mode
                ),
            ));
        };
        let (ivgen_name, ivhash_name) = match ivgen_full.split_once(':') {
            Some((a, h)) => (a, Some(h)),
            None => (ivgen_full, None),
        };
        let ivgen_hash = match ivhash_name {
            Some(h) => Some(
                HashAlg::from_name(h)
                    .ok_or_else(|| self.bad(40, format!("Unsupported hash algorithm '{h}'")))?,
            ),
            None => None,
        };
        let mode = Mode::from_name(mode_name)
            .ok_or_else(|| self.bad(40, format!("Unsupported cipher mode {mode_name}")))?;
        let key_len = usize::try_from(self.key_bytes).unwrap_or(usize::MAX);
        let alg_key = if mode == Mode::Xts {
            if key_len % 2 != 0 {
                return Err(self.bad(108, format!("Unsupported cipher key size {key_len}")));
            }
            key_len / 2
        } else {
            key_len
        };
        let alg = CipherAlg::from_family(&self.cipher_name, alg_key).ok_or_else(|| {
            self.bad(
                8,
                format!(
                    "Unsupported cipher '{}' with key size {}",
                    self.cipher_name,
                    alg_key.saturating_mul(8)
                ),
            )
        })?;
        if alg == CipherAlg::Cast5_128 && mode == Mode::Xts {
            return Err(self.bad(40, "Unsupported cipher mode xts"));
        }
        HashAlg::from_name(&self.hash_spec).ok_or_else(|| {
            self.bad(
                72,
                format!("Unsupported hash algorithm '{}'", self.hash_spec),
            )
        })?;
        let ivgen = IvGen::from_name(ivgen_name)
            .ok_or_else(|| self.bad(40, format!("Unsupported IV generator '{ivgen_name}'")))?;
        let spec = CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash: if ivgen == IvGen::Essiv {
                ivgen_hash
            } else {
                None
            },
        };
        if ivgen == IvGen::Essiv {
            spec.essiv_cipher().map_err(|e| self.bad(40, e))?;
        }
        Ok(spec)
    }

    /// The hash named by `hash-spec`, if QEMU knows it.
    pub fn hash(&self) -> Option<HashAlg> {
        HashAlg::from_name(&self.hash_spec)
    }

    /// Every field with its file offset, value and purpose, for `dump luks`.
    pub fn fields(&self) -> Vec<Field> {
        let o = self.offset;
        let f = |name: &str, off: u64, len: u64, value: String, meaning: &str| Field {
            name: name.into(),
            offset: o.saturating_add(off),
            len,
            value,
            meaning: meaning.into(),
        };
        let mut v = vec![
            f(
                "magic",
                0,
                6,
                self.magic.clone(),
                if self.magic_ok() {
                    "identifies a LUKS header (\"LUKS\" 0xba 0xbe)"
                } else {
                    "should be \"LUKS\" 0xba 0xbe; QEMU says: Volume is not in LUKS format"
                },
            ),
            f(
                "version",
                6,
                2,
                self.version.to_string(),
                "LUKS format version; QEMU reads version 1 only",
            ),
            f(
                "cipher-name",
                8,
                32,
                self.cipher_name.clone(),
                "the block cipher family that encrypts guest data and the key material",
            ),
            f(
                "cipher-mode",
                40,
                32,
                self.cipher_mode.clone(),
                "chaining mode, then the IV generator that turns a sector number into an IV (mode-ivgen[:hash])",
            ),
            f(
                "hash-spec",
                72,
                32,
                self.hash_spec.clone(),
                "hash used by PBKDF2 and by the anti-forensic splitter",
            ),
            f(
                "payload-offset",
                104,
                4,
                format!(
                    "{} sectors ({} bytes)",
                    self.payload_offset_sector,
                    self.payload_offset()
                ),
                "where the encrypted payload would start in a plain LUKS volume; inside qcow2 the L2 tables place the data instead, but QEMU still requires it to lie past the key material",
            ),
            f(
                "key-bytes",
                108,
                4,
                self.key_bytes.to_string(),
                "length of the master key (for XTS, two keys of half this length)",
            ),
            f(
                "mk-digest",
                112,
                20,
                self.mk_digest.clone(),
                "PBKDF2 of the master key: a candidate key from a key slot is correct when it hashes to this",
            ),
            f(
                "mk-digest-salt",
                132,
                32,
                self.mk_digest_salt.clone(),
                "salt for that PBKDF2",
            ),
            f(
                "mk-digest-iter",
                164,
                4,
                self.mk_digest_iterations.to_string(),
                "PBKDF2 iterations for the master-key digest",
            ),
            f(
                "uuid",
                168,
                40,
                self.uuid.clone(),
                "the volume's UUID, as text",
            ),
        ];
        for s in &self.slots {
            let r = s.offset.saturating_sub(o);
            let n = s.index;
            let state = match s.active_raw {
                SLOT_ENABLED => "active: holds a copy of the master key",
                SLOT_DISABLED => "inactive: free",
                _ => {
                    "neither 0x00ac71f3 (active) nor 0x0000dead (free): QEMU calls the slot corrupted"
                }
            };
            v.push(f(
                &format!("slot[{n}].active"),
                r,
                4,
                format!("{:#010x}", s.active_raw),
                state,
            ));
            v.push(f(
                &format!("slot[{n}].iterations"),
                r.saturating_add(4),
                4,
                s.iterations.to_string(),
                "PBKDF2 iterations that turn the passphrase into this slot's key",
            ));
            v.push(f(
                &format!("slot[{n}].salt"),
                r.saturating_add(8),
                32,
                s.salt.clone(),
                "PBKDF2 salt for this slot",
            ));
            v.push(f(&format!("slot[{n}].key-offset"), r.saturating_add(40), 4, format!("{} sectors (file offset {:#x})", s.key_offset_sector, o.saturating_add(s.key_offset())), "where this slot's encrypted, split copy of the master key starts, in sectors from the LUKS header"));
            v.push(f(&format!("slot[{n}].stripes"), r.saturating_add(44), 4, s.stripes.to_string(), "how many stripes the anti-forensic splitter spread the master key over (QEMU accepts 4000 only)"));
        }
        v
    }
}
