//! Unkeyed hashing for data the operator wrote: change detection of whole files, and the maps a routing
//! table is built into. Neither is keyed by request input an attacker can choose to collide (a
//! request only *looks up* a tenant, and only one named by a verified token), so the DoS resistance
//! of std's SipHash buys nothing there, while SipHash was ~7 % of a 100,000-tenant reload and most of a
//! routing lookup.

use std::hash::{BuildHasherDefault, Hasher};

/// One 64-bit step: multiply, then fold the high bits down (hashbrown takes the bucket from the low
/// bits and a tag from the top seven).
pub fn mix(h: u64, word: u64) -> u64 {
    let h = (h ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}

/// `bytes` eight at a time into `h`, the zero-padded tail last, and the length too (so "abc" and
/// "abc\0" differ).
pub fn mix_bytes(h: u64, bytes: &[u8]) -> u64 {
    let (h, tail) = mix_words(h ^ bytes.len() as u64, bytes);
    mix(h, tail_word(tail))
}

/// Every whole eight-byte word of `bytes` into `h`; gives the hash and the bytes left over (fewer
/// than eight). [`mix_bytes`] and the file hash that arrives in pieces both run on it.
#[inline]
pub fn mix_words(mut h: u64, bytes: &[u8]) -> (u64, &[u8]) {
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = mix(h, u64::from_le_bytes(word));
    }
    (h, chunks.remainder())
}

/// Up to eight bytes as one word, zero-padded.
#[inline]
pub fn tail_word(tail: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word[..tail.len()].copy_from_slice(tail);
    u64::from_le_bytes(word)
}

/// A [`Hasher`] built on [`mix`].
#[derive(Clone, Copy)]
pub struct TableHasher(u64);

impl Default for TableHasher {
    fn default() -> Self {
        TableHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for TableHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = mix_bytes(self.0, bytes);
    }
    fn write_u8(&mut self, n: u8) {
        self.0 = mix(self.0, u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = mix(self.0, n);
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = mix(self.0, n as u64);
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = mix(mix(self.0, n as u64), (n >> 64) as u64);
    }
    fn finish(&self) -> u64 {
        // One more round so the last word reaches every bit.
        mix(self.0, 0x2545_f491_4f6c_dd1d)
    }
}

/// For `HashMap<K, V, TableHash>`.
pub type TableHash = BuildHasherDefault<TableHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(t: &T) -> u64 {
        TableHash::default().hash_one(t)
    }

    #[test]
    fn distinct_keys_spread_over_buckets_and_tags() {
        // Sequential GUID-like keys (the worst realistic case: generated tables): the low 17 bits
        // (a 100,000-entry table's buckets) and the top 7 bits (hashbrown's tags) must both spread.
        let n = 1u128 << 17;
        let mut low = std::collections::HashSet::new();
        let mut top = std::collections::HashSet::new();
        for i in 0..n {
            let h = hash(&(i << 64 | i));
            low.insert(h & (n as u64 - 1));
            top.insert(h >> 57);
        }
        // A random function fills ~63 % of the buckets; a degenerate one far fewer.
        assert!(low.len() as f64 > 0.6 * n as f64, "{} buckets", low.len());
        assert_eq!(top.len(), 128);
        assert_ne!(hash(&"abc"), hash(&"abc\0"));
        assert_ne!(hash(&("ab", "c")), hash(&("a", "bc")));
        assert_ne!(hash(&Some(0u64)), hash(&None::<u64>));
    }
}
