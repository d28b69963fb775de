//! Numbers as qemu-io takes them: decimal, 0x-hex, and k/M/G/T/P/E suffixes.

use qinspect::types::{GuestOffset, HostOffset};

/// A guest offset, written as [`parse_size`] takes it.
pub fn parse_guest(s: &str) -> Result<GuestOffset, String> {
    parse_size(s).map(GuestOffset)
}

/// A host (file) offset, written as [`parse_size`] takes it.
pub fn parse_host(s: &str) -> Result<HostOffset, String> {
    parse_size(s).map(HostOffset)
}

/// Parse `64k`, `0x10000`, `1M`, `512`, `1.5G` (a fraction only with a suffix).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty number".into());
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16)
            .map_err(|_| format!("'{s}' is not a valid hex number"));
    }
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => {
                    return Err(format!(
                        "'{s}': unknown suffix '{c}' (use k, M, G, T, P or E)"
                    ));
                }
            };
            (&t[..i], 1u64 << shift)
        }
        _ => (t, 1),
    };
    if let Ok(v) = digits.parse::<u64>() {
        return v
            .checked_mul(mult)
            .ok_or_else(|| format!("'{s}' is too large"));
    }
    if mult > 1
        && let Ok(f) = digits.parse::<f64>()
    {
        let v = f * mult as f64;
        if f >= 0.0 && v < u64::MAX as f64 && v.fract() == 0.0 {
            return Ok(v as u64);
        }
    }
    Err(format!("'{s}' is not a number (try 65536, 0x10000 or 64k)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_io_style_numbers() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("0x10000"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("16E").is_err());
        assert!(parse_size("12q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("0xzz").is_err());
    }

    #[test]
    fn offsets_parse_into_their_address_space() {
        assert_eq!(parse_guest("64k"), Ok(GuestOffset(65536)));
        assert_eq!(parse_host("0x200"), Ok(HostOffset(512)));
        assert!(parse_guest("12q").is_err());
        assert!(parse_host("").is_err());
    }
}
