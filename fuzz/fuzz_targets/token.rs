//! License tokens: the JWT parser and verifier (`tollgate_core::token::verify`) and the
//! per-request path the filter takes with a credential (`Gate::admit`), on tokens the fuzzer
//! writes (mostly refused at the signature), on claims it writes that the harness signs (so
//! they reach the claims checks and the license's limits), and on JWKS documents as a keys
//! endpoint would answer them.
#![no_main]

use std::rc::Rc;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tollgate_core::token::{self, KeySet};
use tollgate_core::{Gate, MemoryCells, Policy, RequestHead, UsageTotals};
use tollgate_fuzz_common::{self as common, layout, NOW};

const SECOND_NANOS: u64 = 1_000_000_000;

/// Compiled once: compiling parses three keys, one of them RSA.
fn policy() -> &'static Arc<Policy> {
    static POLICY: OnceLock<Arc<Policy>> = OnceLock::new();
    POLICY.get_or_init(|| {
        let config = common::filter_config().to_string();
        Arc::new(Policy::from_json(config.as_bytes()).expect("fuzz filter config"))
    })
}

fn remote_policy() -> &'static Arc<Policy> {
    static POLICY: OnceLock<Arc<Policy>> = OnceLock::new();
    POLICY.get_or_init(|| {
        let config = common::remote_keys_config().to_string();
        Arc::new(Policy::from_json(config.as_bytes()).expect("fuzz remote-keys config"))
    })
}

/// A valid token of each key, for the fetched key sets to verify.
fn known_tokens() -> &'static [String] {
    static TOKENS: OnceLock<Vec<String>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let claims = common::claims("pro", &["search", "design"]);
        common::keys()
            .all()
            .iter()
            .map(|key| key.sign(&claims).expect("signing"))
            .collect()
    })
}

/// Requests on a licensed route of each kind, with a user header and a client address.
fn ask(gate: &mut Gate<Rc<MemoryCells>>, credential: &str, now_nanos: u64) {
    for (method, path) in [("GET", "/v1/search?q=1"), ("POST", "/v1/design/new")] {
        let admission = gate.admit(
            &RequestHead {
                method,
                path,
                credential: Some(credential),
                user: Some("user-header"),
                client_address: Some("192.0.2.7"),
            },
            now_nanos,
        );
        let _ = admission.ratelimit_headers();
        let _ = admission.upstream_headers(gate.policy());
        gate.record(
            &admission,
            UsageTotals {
                calls: 1,
                request_bytes: 10,
                response_bytes: 100,
                processing_nanos: 1_000,
            },
        );
    }
    let _ = gate.sync_work(now_nanos / 1_000_000);
    let _ = gate.drain_usage();
}

/// A token as the filter meets it: verified alone, then through a fresh gate.
fn check_token(token: &str) {
    let policy = policy();
    let verified = token::verify(policy, None, token, NOW);
    let again = token::verify(policy, None, token, NOW);
    // Verification is a pure function of the token, the configuration and the clock.
    assert_eq!(
        verified
            .as_ref()
            .map(|l| (&l.account, &l.license_id, l.expires_at))
            .map_err(|e| e.code),
        again
            .as_ref()
            .map(|l| (&l.account, &l.license_id, l.expires_at))
            .map_err(|e| e.code),
    );
    let mut gate = Gate::new(Arc::clone(policy), Rc::new(MemoryCells::default()));
    ask(&mut gate, &format!("Bearer {token}"), NOW * SECOND_NANOS);
}

fn check_jwks(body: &[u8]) {
    // The parser alone, then as the gate takes an answer of the keys endpoint.
    if let Ok((keys, _skipped)) = KeySet::from_remote_jwks(body) {
        assert!(!keys.is_empty(), "an accepted JWKS has a usable key");
        for token in known_tokens() {
            let _ = token::verify(remote_policy(), Some(&keys), token, NOW);
        }
    }
    let cells = Rc::new(MemoryCells::default());
    let mut gate = Gate::new(Arc::clone(remote_policy()), Rc::clone(&cells));
    let now_ms = NOW * 1000;
    if gate.jwks_due(now_ms).is_some() {
        gate.jwks_started(true, now_ms);
    }
    let _ = gate.jwks_answered(Some((200, body)), now_ms);
    for token in known_tokens() {
        ask(&mut gate, &format!("Bearer {token}"), NOW * SECOND_NANOS);
    }
    // A second VM takes the set the first stored in shared data.
    let mut next = Gate::new(Arc::clone(remote_policy()), cells);
    let _ = next.jwks_due(now_ms + 1);
    if let Some(token) = known_tokens().first() {
        ask(&mut next, &format!("Bearer {token}"), NOW * SECOND_NANOS);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % layout::TOKEN_MODES {
        layout::TOKEN_RAW => check_token(&String::from_utf8_lossy(rest)),
        layout::TOKEN_SIGNED_CLAIMS => {
            let header = common::header(&common::keys().ed);
            check_token(&common::sign_ed25519(header.as_bytes(), rest));
        }
        layout::TOKEN_SIGNED_HEADER_AND_CLAIMS => {
            let (header, claims) = match rest.iter().position(|&b| b == 0) {
                Some(at) => (&rest[..at], &rest[at + 1..]),
                None => (rest, &b""[..]),
            };
            check_token(&common::sign_ed25519(header, claims));
        }
        _ => check_jwks(rest),
    }
});
