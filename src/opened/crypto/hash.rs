//! The hash functions a LUKS header can name, for PBKDF2, the anti-forensic
//! splitter and the ESSIV IV generator.

use sha2::Digest;

/// A hash algorithm, by the name LUKS stores in `hash-spec` (and QEMU accepts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlg {
    /// MD5 (16-byte digest).
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-224 (28 bytes).
    Sha224,
    /// SHA-256 (32 bytes).
    Sha256,
    /// SHA-384 (48 bytes).
    Sha384,
    /// SHA-512 (64 bytes).
    Sha512,
    /// RIPEMD-160 (20 bytes).
    Ripemd160,
    /// SM3 (32 bytes).
    Sm3,
}

impl HashAlg {
    /// Look up a LUKS hash name ("sha256", ...).
    pub fn from_name(name: &str) -> Option<HashAlg> {
        Some(match name {
            "md5" => HashAlg::Md5,
            "sha1" => HashAlg::Sha1,
            "sha224" => HashAlg::Sha224,
            "sha256" => HashAlg::Sha256,
            "sha384" => HashAlg::Sha384,
            "sha512" => HashAlg::Sha512,
            "ripemd160" => HashAlg::Ripemd160,
            "sm3" => HashAlg::Sm3,
            _ => return None,
        })
    }

    /// The name as LUKS and QEMU spell it.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Md5 => "md5",
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha224 => "sha224",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha384 => "sha384",
            HashAlg::Sha512 => "sha512",
            HashAlg::Ripemd160 => "ripemd160",
            HashAlg::Sm3 => "sm3",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Md5 => 16,
            HashAlg::Sha1 | HashAlg::Ripemd160 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 | HashAlg::Sm3 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            HashAlg::Md5 => run::<md5::Md5>(parts),
            HashAlg::Sha1 => run::<sha1::Sha1>(parts),
            HashAlg::Sha224 => run::<sha2::Sha224>(parts),
            HashAlg::Sha256 => run::<sha2::Sha256>(parts),
            HashAlg::Sha384 => run::<sha2::Sha384>(parts),
            HashAlg::Sha512 => run::<sha2::Sha512>(parts),
            HashAlg::Ripemd160 => run::<ripemd::Ripemd160>(parts),
            HashAlg::Sm3 => run::<sm3::Sm3>(parts),
        }
    }

    /// PBKDF2 with HMAC over this hash: fill `out` from `password` and `salt`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Md5 => pbkdf2_hmac::<md5::Md5>(password, salt, rounds, out),
            HashAlg::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, rounds, out),
            HashAlg::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, rounds, out),
            HashAlg::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, rounds, out),
            HashAlg::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, rounds, out),
            HashAlg::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, rounds, out),
            HashAlg::Ripemd160 => pbkdf2_hmac::<ripemd::Ripemd160>(password, salt, rounds, out),
            HashAlg::Sm3 => pbkdf2_hmac::<sm3::Sm3>(password, salt, rounds, out),
        }
    }
}

/// Undo LUKS's anti-forensic split: `stripes` blocks of `block_len` bytes in
/// `split` become one key. Each stripe but the last is XORed into an
/// accumulator which is then "diffused" (hashed piece by piece with a
/// big-endian counter); the last stripe XOR the accumulator is the key.
/// `split` must hold `block_len * stripes` bytes (the caller checks).
pub fn af_merge(hash: HashAlg, block_len: usize, stripes: usize, split: &[u8]) -> Vec<u8> {
    let mut acc = vec![0u8; block_len];
    let mut chunks = split.chunks_exact(block_len.max(1)).take(stripes);
    for _ in 1..stripes {
        if let Some(stripe) = chunks.next() {
            xor_into(&mut acc, stripe);
        }
        diffuse(hash, &mut acc);
    }
    if let Some(last) = chunks.next() {
        xor_into(&mut acc, last);
    }
    acc
}

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a ^= b;
    }
}

fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let dl = hash.digest_len();
    for (i, piece) in block.chunks_mut(dl).enumerate() {
        let counter = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
        let d = hash.digest(&[&counter, piece]);
        let n = piece.len();
        piece.copy_from_slice(crate::bytes::slice(&d, 0, n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_digest_lengths_match() {
        for h in [
            HashAlg::Md5,
            HashAlg::Sha1,
            HashAlg::Sha224,
            HashAlg::Sha256,
            HashAlg::Sha384,
            HashAlg::Sha512,
            HashAlg::Ripemd160,
            HashAlg::Sm3,
        ] {
            assert_eq!(HashAlg::from_name(h.name()), Some(h));
            assert_eq!(h.digest(&[b"x"]).len(), h.digest_len());
        }
        assert_eq!(HashAlg::from_name("whirlpool"), None);
    }

    #[test]
    fn pbkdf2_matches_rfc6070_vector() {
        // RFC 6070, test 2: "password"/"salt", 2 iterations, HMAC-SHA1.
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957");
    }

    #[test]
    fn one_stripe_is_the_key_itself() {
        let key = [7u8; 32];
        assert_eq!(af_merge(HashAlg::Sha256, 32, 1, &key), key.to_vec());
        // Two stripes: the last one XOR the diffused first one.
        let split = [1u8; 64];
        let mut acc = vec![1u8; 32];
        diffuse(HashAlg::Sha256, &mut acc);
        let want: Vec<u8> = acc.iter().map(|a| a ^ 1).collect();
        assert_eq!(af_merge(HashAlg::Sha256, 32, 2, &split), want);
    }
}
