//! Unlocking: a passphrase tried on every active key slot.

use super::{DIGEST_LEN, LuksHeader, MAX_ITERATIONS};
use crate::crypto::cipher::SectorCipher;
use crate::crypto::hash::{HashAlg, af_merge};
use crate::error::Error;

/// A master key recovered from a key slot.
pub struct MasterKey {
    /// The key (wiped on drop).
    pub key: zeroize::Zeroizing<Vec<u8>>,
    /// The slot that opened.
    pub slot: usize,
}

/// Why a passphrase did not open the header.
#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    /// Every active slot was tried and none matched.
    #[error("no key slot matches this passphrase (active slots tried: {tried:?})")]
    NoSlotMatches {
        /// The active slots tried.
        tried: Vec<usize>,
    },
    /// The header itself is not usable.
    #[error(transparent)]
    Header(#[from] Error),
}

/// Try `passphrase` on every active key slot, as QEMU does; the master-key
/// digest tells the right key from a wrong one. A slot whose key material
/// cannot be read (past the extension or the file) fails the whole unlock with
/// the slot and the reason, as it does in QEMU.
pub fn unlock(
    h: &LuksHeader,
    src: &dyn crate::io::Source,
    passphrase: &[u8],
) -> std::result::Result<MasterKey, UnlockError> {
    let spec = h.check()?;
    let hash = h.hash().unwrap_or(HashAlg::Sha256);
    if h.mk_digest_iterations > MAX_ITERATIONS {
        return Err(h
            .bad(
                164,
                format!(
                    "master-key digest asks for {} PBKDF2 iterations, more than qinspect's limit of {MAX_ITERATIONS}",
                    h.mk_digest_iterations
                ),
            )
            .into());
    }
    let key_len = spec.key_len();
    // The passphrase stops at a NUL, as QEMU's strlen does.
    let pass = crate::bytes::c_string(passphrase);
    let mut tried = Vec::new();
    for s in h.slots.iter().filter(|s| s.active()) {
        tried.push(s.index);
        let rel = s.offset.saturating_sub(h.offset);
        if s.iterations > MAX_ITERATIONS {
            return Err(h
                .bad(
                    rel.saturating_add(4),
                    format!(
                        "key slot {} asks for {} PBKDF2 iterations, more than qinspect's limit of {MAX_ITERATIONS}",
                        s.index, s.iterations
                    ),
                )
                .into());
        }
        let mat_len = s.material_len(h.key_bytes);
        let end = s.key_offset().saturating_add(mat_len);
        if end > h.length {
            return Err(h
                .bad(
                    rel.saturating_add(40),
                    format!(
                        "key slot {}: key material {:#x}..{end:#x} is outside the {}-byte region the crypto header extension reserves (QEMU: Request for data outside of extension header)",
                        s.index,
                        s.key_offset(),
                        h.length
                    ),
                )
                .into());
        }
        let at = h.offset.saturating_add(s.key_offset());
        let what = format!("LUKS key slot {} key material", s.index);
        // key_bytes <= 64 and stripes == 4000 (checked): at most 256000 bytes.
        let mut material = zeroize::Zeroizing::new(crate::io::read_exact(src, &what, at, mat_len)?);
        let mut slot_key = zeroize::Zeroizing::new(vec![0u8; key_len]);
        hash.pbkdf2(pass, &s.salt_bytes, s.iterations, &mut slot_key);
        let c = SectorCipher::new(spec, &slot_key).map_err(|e| h.bad(8, e))?;
        c.decrypt_sectors(0, &mut material);
        let candidate =
            zeroize::Zeroizing::new(af_merge(hash, key_len, s.stripes as usize, &material));
        let mut digest = [0u8; DIGEST_LEN];
        hash.pbkdf2(
            &candidate,
            &h.mk_salt_bytes,
            h.mk_digest_iterations,
            &mut digest,
        );
        if digest == h.mk_digest_bytes {
            return Ok(MasterKey {
                key: candidate,
                slot: s.index,
            });
        }
    }
    Err(UnlockError::NoSlotMatches { tried })
}
