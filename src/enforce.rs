//! Live enforcement: after a reload, every open connection is held to the new configuration
//! (`tls.enforce_on_reload`), as a new connection with the same certificate would be.
//!
//! For each forwarded connection, its client's certificate chain (as its TLS session holds
//! it) is verified again with the reloaded trust (roots and CRLs, at the current time), its
//! certificate is matched again against the reloaded `[[client]]` entries (first match, as at
//! admission), and the entry it now matches must still allow the group of the upstream the
//! connection is on (an upstream the reload removed keeps its connections, as before). A connection that fails is closed with the reason: `revoked` (a reloaded CRL lists it),
//! `cert_expired` (it expired while open), `untrusted` (its chain no longer ends at a
//! configured root, or its CA's CRL is stale under `crl_stale = "refuse"`), `unauthorized`
//! (no entry, or not this upstream). The client gets close_notify and the upstream a reset.
//! All of them are closed together, in one close wait, after the registry's lock is let go.

use rustls::pki_types::UnixTime;
use rustls::{CertificateError, Error};

use crate::authz::Authorizer;
use crate::forward::EndReason;
use crate::identity::CertNames;
use crate::sessions::Sessions;
use crate::tls::{PeerError, TlsContext};

/// Checks every session in `sessions` against `tls` and `authz` and closes those they refuse;
/// returns the closes, counted by reason.
pub fn after_reload(
    sessions: &Sessions,
    tls: &TlsContext,
    authz: &Authorizer,
) -> Vec<(EndReason, usize)> {
    let now = UnixTime::now();
    sessions.recheck(|group, link| {
        // A session without a chain cannot exist (the verifier requires one); keep it rather
        // than guess.
        let chain = link.peer_certificates()?;
        let anchor = match tls.trust().verify(&chain, now) {
            Ok(anchor) => anchor,
            Err(e) => return Some(refusal(&e)),
        };
        let names = match CertNames::read(chain.first()?) {
            Ok(names) => names,
            Err(_) => return Some(EndReason::Untrusted),
        };
        match authz.identify(&names, anchor) {
            Ok((identity, _)) if authz.allows_group(&identity.name, group) => None,
            _ => Some(EndReason::Unauthorized),
        }
    })
}

/// The end reason of a chain the reloaded trust refuses.
fn refusal(e: &PeerError) -> EndReason {
    match e {
        PeerError::Refused(Error::InvalidCertificate(CertificateError::Revoked)) => {
            EndReason::Revoked
        }
        PeerError::Refused(Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => EndReason::CertExpired,
        _ => EndReason::Untrusted,
    }
}

/// `counts` as a phrase for the log: "revoked 1, unauthorized 2".
pub fn describe(counts: &[(EndReason, usize)]) -> String {
    counts
        .iter()
        .map(|(reason, n)| format!("{} {n}", reason.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}
