//! The back-off between tries of something QEMU or the host refused.

/// First delay before a refused cleanup or repair is tried again.
pub(crate) const RETRY_FIRST_MS: u64 = 250;
/// Longest delay between two tries of a refused cleanup or repair (liveness bounds are built
/// from it).
pub const RETRY_MAX_MS: u64 = 8_000;

/// The delay before try number `attempt + 1`: doubling from [`RETRY_FIRST_MS`] up to
/// [`RETRY_MAX_MS`].
pub(crate) fn retry_delay_ms(attempt: u32) -> u64 {
    RETRY_FIRST_MS
        .saturating_mul(1u64 << attempt.min(16))
        .min(RETRY_MAX_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_from_the_first_up_to_the_longest() {
        assert_eq!(retry_delay_ms(0), 250);
        assert_eq!(retry_delay_ms(1), 500);
        assert_eq!(retry_delay_ms(5), RETRY_MAX_MS);
        assert_eq!(retry_delay_ms(u32::MAX), RETRY_MAX_MS);
    }
}
