//! Client certificate chains that verified on a resumption, remembered by the trust that
//! verified them, so that the next resumption of the same chain is not verified from scratch.
//!
//! lclb checks a resumed session's chain again at the time of each resumption, where rustls
//! would reuse the session's old verdict: the chain must be unexpired and unrevoked now. Of
//! that check, only the certificates' dates depend on when it runs. The signatures and the path
//! to a CA do not, and neither does the revocation status: it is judged against the trust's
//! own CRLs, fixed for the trust's lifetime (a reload builds a new trust, with an empty
//! memory), and webpki is not asked to judge a CRL's nextUpdate (lclb's `crl_stale` check does
//! that on every connection, cached or not). So a chain that verified once is accepted again
//! while the current time lies within the validity of every certificate it presented, and
//! verified in full otherwise. What that saves is the ECDSA or RSA verification of the CA's
//! signature, the largest cost of a resumption after the key exchange.
//!
//! A chain is known by the SHA-256 of its certificates (each with its length), so two chains
//! share an entry only if they are byte for byte the same.

use std::collections::HashMap;

use aws_lc_rs::digest::{Context, SHA256};
use parking_lot::Mutex;
use rustls::pki_types::{CertificateDer, UnixTime};

/// Most chains remembered; when full, the memory starts again empty (a resumption then pays
/// one full verification), so a flood of distinct certificates cannot grow it.
pub(crate) const MAX_CHAINS: usize = 10_000;

/// The SHA-256 of a chain's certificates.
type ChainKey = [u8; 32];

/// What a verified chain is remembered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    /// The CA it verified against (an index into the trust's anchors).
    anchor: usize,
    /// The latest notBefore and the earliest notAfter of its certificates, Unix seconds: while
    /// the time lies in between, every date check passes as it did.
    not_before: u64,
    not_after: u64,
}

/// The chains one trust verified on resumptions.
#[derive(Debug, Default)]
pub(crate) struct VerifiedChains {
    chains: Mutex<HashMap<ChainKey, Verdict>>,
}

impl VerifiedChains {
    /// The anchor `verify` gives for this chain at `now`, from memory when the chain verified
    /// before and `now` is within all its certificates' validity; otherwise `verify` runs,
    /// and a success is remembered.
    pub(crate) fn anchor<E>(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        verify: impl FnOnce() -> Result<usize, E>,
    ) -> Result<usize, E> {
        let key = key_of(end_entity, intermediates);
        let secs = now.as_secs();
        let known = self.chains.lock().get(&key).copied();
        if let Some(v) = known {
            if v.not_before <= secs && secs <= v.not_after {
                return Ok(v.anchor);
            }
        }
        // Verified outside the lock: a verification takes tens of microseconds.
        let anchor = verify()?;
        if let Some((not_before, not_after)) = validity(end_entity, intermediates) {
            let mut chains = self.chains.lock();
            if chains.len() >= MAX_CHAINS {
                chains.clear();
            }
            chains.insert(
                key,
                Verdict {
                    anchor,
                    not_before,
                    not_after,
                },
            );
        }
        Ok(anchor)
    }

    /// Chains remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.chains.lock().len()
    }
}

fn key_of(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> ChainKey {
    let mut ctx = Context::new(&SHA256);
    for cert in std::iter::once(end_entity).chain(intermediates) {
        // Lengths first, so that no two different chains hash the same bytes.
        ctx.update(&(cert.len() as u64).to_be_bytes());
        ctx.update(cert);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// The latest notBefore and the earliest notAfter of the chain's certificates, or `None` when
/// one does not parse or has a date before 1970 (such a chain is then never remembered).
fn validity(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Option<(u64, u64)> {
    let mut window = (0u64, u64::MAX);
    for cert in std::iter::once(end_entity).chain(intermediates) {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
        let v = parsed.validity();
        let from = u64::try_from(v.not_before.timestamp()).ok()?;
        let until = u64::try_from(v.not_after.timestamp()).ok()?;
        window = (window.0.max(from), window.1.min(until));
    }
    Some(window)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{date_time_ymd, CertificateParams, KeyPair};
    use std::cell::Cell;
    use std::time::Duration;

    fn cert(from: (i32, u8, u8), until: (i32, u8, u8)) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(vec!["client.lb.com".into()]).unwrap();
        params.not_before = date_time_ymd(from.0, from.1, from.2);
        params.not_after = date_time_ymd(until.0, until.1, until.2);
        let key = KeyPair::generate().unwrap();
        CertificateDer::from(params.self_signed(&key).unwrap().der().to_vec())
    }

    fn at(y: i32, m: u8, d: u8) -> UnixTime {
        let t = date_time_ymd(y, m, d).unix_timestamp();
        UnixTime::since_unix_epoch(Duration::from_secs(t as u64))
    }

    #[test]
    fn a_chain_that_verified_is_not_verified_again_within_its_dates() {
        let chains = VerifiedChains::default();
        let leaf = cert((2020, 1, 1), (2030, 1, 1));
        let calls = Cell::new(0);
        let verify = || {
            calls.set(calls.get() + 1);
            Ok::<_, ()>(3)
        };
        assert_eq!(chains.anchor(&leaf, &[], at(2025, 1, 1), verify), Ok(3));
        assert_eq!(chains.anchor(&leaf, &[], at(2026, 6, 1), verify), Ok(3));
        assert_eq!(calls.get(), 1, "the second resumption came from memory");
        assert_eq!(chains.len(), 1);
    }

    #[test]
    fn outside_any_certificates_dates_the_chain_is_verified_again() {
        let chains = VerifiedChains::default();
        let leaf = cert((2020, 1, 1), (2030, 1, 1));
        // The intermediate expires first: its date bounds the memory.
        let intermediate = cert((2022, 1, 1), (2027, 1, 1));
        let chain = [intermediate];
        assert_eq!(
            chains.anchor(&leaf, &chain, at(2025, 1, 1), || Ok::<_, ()>(0)),
            Ok(0)
        );
        let refused = || Err::<usize, _>("expired");
        assert_eq!(
            chains.anchor(&leaf, &chain, at(2027, 1, 2), refused),
            Err("expired"),
            "after the intermediate's notAfter"
        );
        assert_eq!(
            chains.anchor(&leaf, &chain, at(2021, 6, 1), refused),
            Err("expired"),
            "before the intermediate's notBefore"
        );
        let calls = Cell::new(0);
        let verify = || {
            calls.set(calls.get() + 1);
            Ok::<_, ()>(0)
        };
        assert_eq!(
            chains.anchor(&leaf, &chain, at(2026, 12, 31), verify),
            Ok(0)
        );
        assert_eq!(calls.get(), 0, "inside every date, from memory");
    }

    #[test]
    fn a_refused_chain_is_not_remembered_and_chains_differ_by_every_certificate() {
        let chains = VerifiedChains::default();
        let leaf = cert((2020, 1, 1), (2030, 1, 1));
        let other = cert((2020, 1, 1), (2030, 1, 1));
        let now = at(2025, 1, 1);
        assert_eq!(
            chains.anchor(&leaf, &[], now, || Err::<usize, _>(())),
            Err(())
        );
        assert_eq!(chains.len(), 0);
        assert_eq!(chains.anchor(&leaf, &[], now, || Ok::<_, ()>(1)), Ok(1));
        // The same leaf with an intermediate after it is another chain.
        assert_eq!(
            chains.anchor(&leaf, std::slice::from_ref(&other), now, || Ok::<_, ()>(2)),
            Ok(2)
        );
        assert_eq!(chains.anchor(&other, &[], now, || Ok::<_, ()>(4)), Ok(4));
        assert_eq!(chains.len(), 3);
        assert_eq!(chains.anchor(&leaf, &[], now, || Ok::<_, ()>(9)), Ok(1));
    }

    #[test]
    fn a_full_memory_starts_again_empty() {
        let chains = VerifiedChains::default();
        let leaf = cert((2020, 1, 1), (2030, 1, 1));
        {
            let mut map = chains.chains.lock();
            for i in 0..MAX_CHAINS {
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&(i as u64).to_be_bytes());
                map.insert(
                    key,
                    Verdict {
                        anchor: 0,
                        not_before: 0,
                        not_after: u64::MAX,
                    },
                );
            }
        }
        assert_eq!(
            chains.anchor(&leaf, &[], at(2025, 1, 1), || Ok::<_, ()>(0)),
            Ok(0)
        );
        assert_eq!(chains.len(), 1);
    }

    #[test]
    fn a_certificate_that_does_not_parse_is_never_remembered() {
        let chains = VerifiedChains::default();
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let now = at(2025, 1, 1);
        assert_eq!(chains.anchor(&junk, &[], now, || Ok::<_, ()>(0)), Ok(0));
        assert_eq!(chains.len(), 0);
    }
}
