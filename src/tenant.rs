//! `TenantId`: the one definition of a tenant in fhir-edge.
//!
//! A tenant is the customer's Azure AD tenant ID, a GUID (Teams EHR integration document). It is parsed
//! exactly once, from the canonical 8-4-4-4-12 hexadecimal form (either case), and held as its 128 bits so the
//! routing lookup hashes sixteen bytes and allocates nothing. Its `Display` form is the canonical
//! lowercase GUID used in tokens, logs and the routing table. Braces, `urn:uuid:` prefixes and the 32-digit
//! form without hyphens are *not* tenants: accepting several spellings of one identifier is how two
//! components come to disagree about which tenant a request belongs to.

use std::fmt;

/// A tenant GUID in canonical form: its high and low 64 bits. Two `u64`s rather than one `u128`, whose
/// 16-byte alignment would pad every routing-table entry and route that holds one (~4 MB for
/// 100,000 tenants); ordered and hashed exactly as the `u128`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TenantId {
    high: u64,
    low: u64,
}

impl std::hash::Hash for TenantId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(self.to_u128());
    }
}

/// Positions of the four hyphens in `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
const HYPHENS: [usize; 4] = [8, 13, 18, 23];
const GUID_LEN: usize = 36;

impl TenantId {
    /// The GUID's 128 bits.
    pub const fn to_u128(self) -> u128 {
        ((self.high as u128) << 64) | self.low as u128
    }

    /// Parses the canonical 8-4-4-4-12 form, hex digits in either case. Anything else is `None`.
    pub fn parse(s: &str) -> Option<TenantId> {
        let bytes = s.as_bytes();
        if bytes.len() != GUID_LEN {
            return None;
        }
        let mut value: u128 = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if HYPHENS.contains(&i) {
                if b != b'-' {
                    return None;
                }
                continue;
            }
            let digit = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => return None,
            };
            value = (value << 4) | u128::from(digit);
        }
        Some(TenantId {
            high: (value >> 64) as u64,
            low: value as u64,
        })
    }

    /// The canonical lowercase 8-4-4-4-12 text, on the stack: what `Display` writes, for callers
    /// that want a `&str` (a metric label) without allocating one per request.
    pub fn text(self) -> GuidText {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let v = self.to_u128();
        let mut out = [b'-'; GUID_LEN];
        let mut shift = 128;
        for (i, slot) in out.iter_mut().enumerate() {
            if !HYPHENS.contains(&i) {
                shift -= 4;
                *slot = HEX[((v >> shift) & 0xf) as usize];
            }
        }
        GuidText(out)
    }

    /// True when `s` looks like an attempt to name a tenant in a form we do not accept: braces,
    /// `urn:uuid:`, or 32 hex digits without hyphens. Used by the scope parser to refuse ambiguous
    /// scopes rather than silently ignore a second, oddly spelled tenant.
    pub fn is_non_canonical_spelling(s: &str) -> bool {
        if TenantId::parse(s).is_some() {
            return false;
        }
        let lower = s.to_ascii_lowercase();
        let inner = lower
            .strip_prefix("urn:uuid:")
            .unwrap_or(&lower)
            .trim_start_matches('{')
            .trim_end_matches('}');
        let hex: Vec<u8> = inner.bytes().filter(|&b| b != b'-').collect();
        hex.len() == 32 && hex.iter().all(u8::is_ascii_hexdigit)
    }
}

/// A tenant GUID's canonical text ([`TenantId::text`]).
#[derive(Clone, Copy)]
pub struct GuidText([u8; GUID_LEN]);

impl std::ops::Deref for GuidText {
    type Target = str;
    fn deref(&self) -> &str {
        // Hex digits and hyphens only, so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_the_hex_of_the_128_bit_value_in_8_4_4_4_12_groups() {
        for s in [
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            "0123abcd-4567-89ef-fedc-ba9876543210",
            "80000000-0000-0000-0000-000000000001",
        ] {
            let t = TenantId::parse(s).unwrap();
            let v = t.to_u128();
            let expected = format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                (v >> 96) as u32,
                ((v >> 80) & 0xffff) as u16,
                ((v >> 64) & 0xffff) as u16,
                ((v >> 48) & 0xffff) as u16,
                v & 0xffff_ffff_ffff
            );
            assert_eq!(&*t.text(), expected);
            assert_eq!(&*t.text(), s);
        }
    }

    #[test]
    fn canonical_guid_round_trips_lowercase() {
        let t = TenantId::parse("145F4184-1B0B-41C7-BA24-B3C1291BFDA1");
        assert_eq!(
            t.map(|t| t.to_string()).as_deref(),
            Some("145f4184-1b0b-41c7-ba24-b3c1291bfda1")
        );
        assert_eq!(t, TenantId::parse("145f4184-1b0b-41c7-ba24-b3c1291bfda1"));
    }

    #[test]
    fn order_and_layout_are_those_of_the_128_bit_value() {
        let ids: Vec<TenantId> = [
            "00000000-0000-0000-0000-000000000002",
            "00000000-0000-0001-0000-000000000001",
            "ffffffff-ffff-ffff-0000-000000000000",
            "00000000-0000-0000-ffff-ffffffffffff",
        ]
        .iter()
        .filter_map(|s| TenantId::parse(s))
        .collect();
        assert_eq!(ids.len(), 4);
        let mut by_id = ids.clone();
        by_id.sort();
        let mut by_value = ids.clone();
        by_value.sort_by_key(|t| t.to_u128());
        assert_eq!(by_id, by_value);
        // Eight-byte alignment keeps a (TenantId, pointer) map entry at 24 bytes, not 32.
        assert_eq!(std::mem::align_of::<TenantId>(), 8);
        assert_eq!(std::mem::size_of::<(TenantId, usize)>(), 24);
    }

    #[test]
    fn leading_zeroes_are_kept() {
        let s = "00000000-0000-0000-0000-000000000001";
        assert_eq!(
            TenantId::parse(s).map(|t| t.to_string()).as_deref(),
            Some(s)
        );
    }

    #[test]
    fn non_canonical_spellings_are_not_tenants() {
        for s in [
            "{145f4184-1b0b-41c7-ba24-b3c1291bfda1}",
            "urn:uuid:145f4184-1b0b-41c7-ba24-b3c1291bfda1",
            "145f41841b0b41c7ba24b3c1291bfda1",
            "145f4184-1b0b-41c7-ba24-b3c1291bfda",
            "145f4184-1b0b-41c7-ba24-b3c1291bfda1 ",
            "145f4184_1b0b-41c7-ba24-b3c1291bfda1",
            "g45f4184-1b0b-41c7-ba24-b3c1291bfda1",
            "+45f4184-1b0b-41c7-ba24-b3c1291bfda1",
            "",
        ] {
            assert_eq!(TenantId::parse(s), None, "{s:?}");
        }
        assert!(TenantId::is_non_canonical_spelling(
            "{145f4184-1b0b-41c7-ba24-b3c1291bfda1}"
        ));
        assert!(TenantId::is_non_canonical_spelling(
            "urn:uuid:145F4184-1b0b-41c7-ba24-b3c1291bfda1"
        ));
        assert!(TenantId::is_non_canonical_spelling(
            "145f41841b0b41c7ba24b3c1291bfda1"
        ));
        assert!(!TenantId::is_non_canonical_spelling("system/*.read"));
        assert!(!TenantId::is_non_canonical_spelling(
            "145f4184-1b0b-41c7-ba24-b3c1291bfda1"
        ));
    }
}
