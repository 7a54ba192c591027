//! The core's decisions on real signed tokens, with an injected clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::rc::Rc;
use std::sync::Arc;

use serde_json::{json, Value};
use tollgate_core::routes::{PathRoute, RouteTarget};
use tollgate_core::{Code, Gate, MemoryCells, Outcome, Policy, RequestHead, UsageTotals, Verdict};
use tollgate_devkit::{jwks, LicenseSpec, SigningKey};

const NOW: u64 = 1_780_000_000;
const SECOND: u64 = 1_000_000_000;

type Keys = tollgate_devkit::keys::KeyTrio;

fn keys() -> &'static Keys {
    tollgate_devkit::keys::test_keys().unwrap()
}

fn config() -> Value {
    let k = keys();
    json!({
        "token": {
            "issuers": ["https://licenses.example"],
            "audiences": ["api.example"],
            "jwks": jwks([&k.ed, &k.es, &k.rs]),
        },
        "plans": {
            "starter": {"rate_limit": {"requests_per_second": 2, "burst": 3}},
            "pro": {"feature_rate_limits": {"design": {"requests_per_second": 1, "burst": 1}}},
        },
        "routes": [
            {"path": "/healthz", "public": true},
            {"prefix": "/v1/search", "feature": "search"},
            {"prefix": "/v1/design", "methods": ["POST"], "feature": "design"},
        ],
    })
}

fn gate_with(config: &Value) -> Gate<Rc<MemoryCells>> {
    let policy = Policy::from_json(config.to_string().as_bytes()).unwrap();
    Gate::new(Arc::new(policy), Rc::new(MemoryCells::default()))
}

fn gate() -> Gate<Rc<MemoryCells>> {
    gate_with(&config())
}

fn spec(plan: &str, features: &[&str]) -> LicenseSpec {
    let mut spec = LicenseSpec::new("acct-1", "lic-1", plan, features);
    spec.issuer = Some("https://licenses.example".into());
    spec.audience = Some("api.example".into());
    spec
}

fn token(key: &SigningKey, spec: &LicenseSpec) -> String {
    key.sign(&spec.claims_at(NOW)).unwrap()
}

fn ask(
    gate: &mut Gate<Rc<MemoryCells>>,
    method: &str,
    path: &str,
    credential: Option<&str>,
    at: u64,
) -> Verdict {
    gate.admit(
        &RequestHead {
            method,
            path,
            credential,
            user: None,
            client_address: None,
        },
        at * SECOND,
    )
    .verdict
}

fn code(verdict: Verdict) -> Option<Code> {
    match verdict {
        Verdict::Refuse(r) => Some(r.code),
        _ => None,
    }
}

#[test]
fn each_algorithm_verifies_and_sets_upstream_headers() {
    let k = keys();
    for key in [&k.ed, &k.es, &k.rs] {
        let mut gate = gate();
        let bearer = format!("Bearer {}", token(key, &spec("starter", &["search"])));
        let admission = gate.admit(
            &RequestHead {
                method: "GET",
                path: "/v1/search?q=1",
                credential: Some(&bearer),
                user: None,
                client_address: None,
            },
            NOW * SECOND,
        );
        assert_eq!(admission.verdict, Verdict::Allow, "{:?}", key.file.alg);
        let policy = Arc::clone(gate.policy());
        let headers = admission.upstream_headers(&policy);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_ref())).collect();
        assert_eq!(
            headers,
            vec![
                ("x-tollgate-account", "acct-1"),
                ("x-tollgate-license", "lic-1"),
                ("x-tollgate-plan", "starter"),
                ("x-tollgate-feature", "search"),
            ]
        );
    }
}

#[test]
fn one_combined_header_carries_the_context_as_a_structured_dictionary() {
    let mut config = config();
    config["upstream_headers"] = json!({
        "account": null, "license": null, "plan": null, "feature": "x-feature",
        "combined": "x-tollgate-context",
    });
    let mut gate = gate_with(&config);
    // An account id with a quote, and a license id beyond ASCII.
    let mut spec = spec("starter", &["search"]);
    spec.account = "acme \"eu\"".into();
    spec.license_id = "lic-\u{e9}".into();
    let bearer = format!("Bearer {}", token(&keys().ed, &spec));
    let admission = gate.admit(
        &RequestHead {
            method: "GET",
            path: "/v1/search",
            credential: Some(&bearer),
            user: None,
            client_address: None,
        },
        NOW * SECOND,
    );
    assert_eq!(admission.verdict, Verdict::Allow);
    let policy = Arc::clone(gate.policy());
    let headers = admission.upstream_headers(&policy);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_ref())).collect();
    assert_eq!(
        headers,
        vec![
            ("x-feature", "search"),
            (
                "x-tollgate-context",
                r#"account="acme \"eu\"", license=%"lic-%c3%a9", plan="starter", feature="search""#
            ),
        ]
    );
    // Stripped from public requests like the four.
    assert!(policy
        .upstream_headers
        .names()
        .any(|n| n == "x-tollgate-context"));
}

#[test]
fn license_headers_need_distinct_names() {
    let mut config = config();
    config["upstream_headers"] = json!({"combined": "x-tollgate-plan"});
    let err = Policy::from_json(config.to_string().as_bytes()).unwrap_err();
    assert_eq!(err.field, "upstream_headers", "{err}");
}

#[test]
fn the_method_is_read_only_where_a_route_names_methods() {
    let method_matters =
        |policy: &Policy, path: &str| policy.routes.lookup_path(path) == PathRoute::NeedsMethod;
    let needs_license = |policy: &Policy, method: &str, path: &str| {
        let target = match policy.routes.lookup_path(path) {
            PathRoute::Found(target) => target,
            PathRoute::NeedsMethod => policy.routes.lookup(method, path),
        };
        matches!(target, Some(RouteTarget::Feature(_)))
    };
    let policy = gate().policy().clone();
    // /v1/design takes only POST; /v1/search and /healthz every method.
    assert!(method_matters(&policy, "/v1/design/x"));
    assert!(!method_matters(&policy, "/v1/search?q=1"));
    assert!(!method_matters(&policy, "/healthz"));
    assert!(!method_matters(&policy, "/elsewhere"));
    // A route taking every method after one naming methods: the method still decides.
    let mut config = config();
    config["routes"] = json!([
        {"prefix": "/v1/design", "methods": ["POST"], "feature": "design"},
        {"prefix": "/v1/", "feature": "search"},
    ]);
    let policy = Policy::from_json(config.to_string().as_bytes()).unwrap();
    assert!(method_matters(&policy, "/v1/design"));
    assert!(!method_matters(&policy, "/v1/search"));
    // And the token only for a licensed feature's route.
    assert!(needs_license(&policy, "", "/v1/search?q=1"));
    assert!(!needs_license(&policy, "", "/healthz"));
    let gate = gate();
    assert!(!needs_license(gate.policy(), "", "/healthz"));
    assert!(!needs_license(gate.policy(), "GET", "/v1/design/x"));
    assert!(needs_license(gate.policy(), "POST", "/v1/design/x"));
}

#[test]
fn scheme_is_case_insensitive_but_must_be_separated() {
    let mut gate = gate();
    let t = token(&keys().ed, &spec("starter", &["search"]));
    assert_eq!(
        ask(
            &mut gate,
            "GET",
            "/v1/search",
            Some(&format!("bearer  {t}")),
            NOW
        ),
        Verdict::Allow
    );
    assert_eq!(
        code(ask(
            &mut gate,
            "GET",
            "/v1/search",
            Some(&format!("Bearer{t}")),
            NOW
        )),
        Some(Code::InvalidToken)
    );
    assert_eq!(
        code(ask(
            &mut gate,
            "GET",
            "/v1/search",
            Some(&format!("Basic {t}")),
            NOW
        )),
        Some(Code::InvalidToken)
    );
    assert_eq!(
        code(ask(&mut gate, "GET", "/v1/search", Some("Bearer "), NOW)),
        Some(Code::MissingToken)
    );
    assert_eq!(
        code(ask(&mut gate, "GET", "/v1/search", None, NOW)),
        Some(Code::MissingToken)
    );
}

#[test]
fn time_issuer_and_audience_are_checked_against_the_injected_clock() {
    let k = keys();
    let mut gate = gate();
    let t = token(&k.ed, &spec("starter", &["search"]));
    let b = format!("Bearer {t}");
    // Valid for an hour plus the 30 s default leeway.
    assert_eq!(
        ask(&mut gate, "GET", "/v1/search", Some(&b), NOW + 3600 + 30),
        Verdict::Allow
    );
    // The cached entry is not served past exp + leeway either.
    assert_eq!(
        code(ask(
            &mut gate,
            "GET",
            "/v1/search",
            Some(&b),
            NOW + 3600 + 31
        )),
        Some(Code::TokenExpired)
    );
    assert_eq!(
        code(ask(&mut gate, "GET", "/v1/search", Some(&b), NOW - 31)),
        Some(Code::TokenNotYetValid)
    );

    let mut wrong_iss = spec("starter", &["search"]);
    wrong_iss.issuer = Some("https://evil.example".into());
    let b = format!("Bearer {}", token(&k.ed, &wrong_iss));
    assert_eq!(
        code(ask(&mut gate, "GET", "/v1/search", Some(&b), NOW)),
        Some(Code::InvalidIssuer)
    );

    let mut wrong_aud = spec("starter", &["search"]);
    wrong_aud.audience = Some("other.example".into());
    let b = format!("Bearer {}", token(&k.ed, &wrong_aud));
    assert_eq!(
        code(ask(&mut gate, "GET", "/v1/search", Some(&b), NOW)),
        Some(Code::InvalidAudience)
    );
}

#[test]
fn forged_and_malformed_tokens_are_invalid() {
    let k = keys();
    let mut gate = gate();
    let claims = spec("starter", &["search"]).claims_at(NOW);
    let b64 = |v: &Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let good = token(&k.ed, &spec("starter", &["search"]));
    let mut parts: Vec<&str> = good.split('.').collect();

    // alg none, no signature.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "kid": "ed-1"})),
        b64(&claims)
    );
    // HS256 "signed" with the public key bytes, naming an asymmetric key.
    let hs = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("ed-1".into());
        let secret = k.ed.file.public_jwk["x"]
            .as_str()
            .unwrap()
            .as_bytes()
            .to_vec();
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .unwrap()
    };
    // A token from the ES256 key presented under the Ed25519 key's id.
    let swapped = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("ed-1".into());
        k.es.sign_with_header(&header, &claims).unwrap()
    };
    let unknown_kid = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some("../../etc/passwd".into());
        k.ed.sign_with_header(&header, &claims).unwrap()
    };
    // Claims altered after signing.
    let mut richer = claims.clone();
    richer["features"] = json!(["search", "design"]);
    let tampered_claims = b64(&richer);
    parts[1] = &tampered_claims;
    let tampered = parts.join(".");
    let truncated = &good[..good.len() - 5];
    let huge = format!(
        "{}.{}.{}",
        "a".repeat(5000),
        "b".repeat(5000),
        "c".repeat(5000)
    );

    for bad in [
        none.as_str(),
        &hs,
        &swapped,
        &unknown_kid,
        &tampered,
        truncated,
        &huge,
        "x",
        "a.b.c",
        "....",
        "é.é.é",
    ] {
        assert_eq!(
            code(ask(
                &mut gate,
                "GET",
                "/v1/search",
                Some(&format!("Bearer {bad}")),
                NOW
            )),
            Some(Code::InvalidToken),
            "{bad:.60}"
        );
    }
}

/// RFC 7515 section 4.1.11: a `crit` naming an extension the verifier does not understand
/// makes the JWS invalid, and `crit` naming a registered parameter, a parameter the header
/// lacks, a duplicate, or empty is malformed. Each token here is correctly signed by a
/// configured key, so only the header check can refuse it.
#[test]
fn critical_header_extensions_are_refused_for_every_algorithm() {
    let k = keys();
    let mut gate = gate();
    let claims = spec("starter", &["search"]).claims_at(NOW).to_string();
    for (key, alg, kid) in [
        (&k.ed, "EdDSA", "ed-1"),
        (&k.es, "ES256", "es-1"),
        (&k.rs, "RS256", "rs-1"),
    ] {
        let plain = json!({"alg": alg, "kid": kid, "typ": "JWT"});
        let b = format!(
            "Bearer {}",
            key.sign_raw(&plain.to_string(), &claims).unwrap()
        );
        assert_eq!(
            ask(&mut gate, "GET", "/v1/search", Some(&b), NOW),
            Verdict::Allow,
            "{alg} without crit"
        );
        let with = |extra: Value| {
            let mut h = plain.clone();
            for (name, value) in extra.as_object().unwrap() {
                h[name] = value.clone();
            }
            h.to_string()
        };
        for (header, expected) in [
            (
                with(json!({"crit": ["anything"], "anything": true})),
                "understand",
            ),
            (
                with(json!({"crit": ["exp"], "exp": NOW + 60})),
                "understand",
            ),
            (with(json!({"crit": ["b64"], "b64": true})), "understand"),
            (with(json!({"crit": ["anything"]})), "malformed"),
            (with(json!({"crit": []})), "malformed"),
            (with(json!({"crit": ["kid"]})), "malformed"),
            (with(json!({"crit": ["alg"]})), "malformed"),
            (with(json!({"crit": ["x", "x"], "x": 1})), "malformed"),
            (with(json!({"crit": [""], "": 1})), "malformed"),
            (
                with(json!({"crit": "anything", "anything": 1})),
                "well-formed",
            ),
            (with(json!({"crit": [1]})), "well-formed"),
            (with(json!({"crit": null})), "malformed"),
            // Duplicate members of the header: the last `crit` must not hide the first.
            (
                format!(r#"{{"alg":"{alg}","kid":"{kid}","crit":["x"],"x":1,"crit":[]}}"#),
                "well-formed",
            ),
            (
                format!(r#"{{"alg":"{alg}","kid":"{kid}","kid":"{kid}"}}"#),
                "well-formed",
            ),
        ] {
            let b = format!("Bearer {}", key.sign_raw(&header, &claims).unwrap());
            let decision = gate.admit(
                &RequestHead {
                    method: "GET",
                    path: "/v1/search",
                    credential: Some(&b),
                    user: None,
                    client_address: None,
                },
                NOW * SECOND,
            );
            let Verdict::Refuse(refusal) = &decision.verdict else {
                panic!("{alg} {header}: {:?}", decision.verdict);
            };
            assert_eq!(refusal.code, Code::InvalidToken, "{alg} {header}");
            assert!(
                refusal.message.contains(expected),
                "{alg} {header}: {}",
                refusal.message
            );
        }
    }
}

#[test]
fn claims_that_are_not_a_license_are_refused() {
    let k = keys();
    let mut gate = gate();
    let mut claims = spec("starter", &["search"]).claims_at(NOW);
    claims.as_object_mut().unwrap().remove("lid");
    let b = format!("Bearer {}", k.ed.sign(&claims).unwrap());
    assert_eq!(
        code(ask(&mut gate, "GET", "/v1/search", Some(&b), NOW)),
        Some(Code::InvalidLicense)
    );

    let b = format!("Bearer {}", token(&k.ed, &spec("platinum", &["search"])));
    assert_eq!(
        code(ask(&mut gate, "GET", "/v1/search", Some(&b), NOW)),
        Some(Code::UnknownPlan)
    );

    // Control characters in `sub` or `lid` would make usage batches the collector refuses.
    for (claim, value) in [("sub", "acme\ncorp"), ("lid", "lic\u{0}")] {
        let mut claims = spec("starter", &["search"]).claims_at(NOW);
        claims[claim] = json!(value);
        let b = format!("Bearer {}", k.ed.sign(&claims).unwrap());
        assert_eq!(
            code(ask(&mut gate, "GET", "/v1/search", Some(&b), NOW)),
            Some(Code::InvalidLicense),
            "{claim}"
        );
    }
}

#[test]
fn duplicated_claims_are_not_a_license() {
    let k = keys();
    let mut gate = gate();
    let header = r#"{"alg":"EdDSA","kid":"ed-1","typ":"JWT"}"#;
    let claims = format!(
        r#"{{"sub":"acct-1","lid":"lic-1","lid":"lic-other","plan":"starter","features":["search"],"exp":{},"iss":"https://licenses.example","aud":"api.example"}}"#,
        NOW + 60
    );
    let b = format!("Bearer {}", k.ed.sign_raw(header, &claims).unwrap());
    assert_eq!(
        code(ask(&mut gate, "GET", "/v1/search", Some(&b), NOW)),
        Some(Code::InvalidLicense)
    );
    // The same claims without the duplicate pass: the refusal is about the duplicate.
    let clean = claims.replace(r#""lid":"lic-other","#, "");
    let b = format!("Bearer {}", k.ed.sign_raw(header, &clean).unwrap());
    assert_eq!(
        ask(&mut gate, "GET", "/v1/search", Some(&b), NOW),
        Verdict::Allow
    );
}

#[test]
fn features_routes_and_public_paths() {
    let k = keys();
    let mut gate = gate();
    let b = format!("Bearer {}", token(&k.ed, &spec("starter", &["search"])));
    assert_eq!(
        code(ask(&mut gate, "POST", "/v1/design/run", Some(&b), NOW)),
        Some(Code::FeatureNotLicensed)
    );
    // GET is not a route of the design feature: the path is served, but not for GET.
    assert_eq!(
        code(ask(&mut gate, "GET", "/v1/design/run", Some(&b), NOW)),
        Some(Code::MethodNotAllowed)
    );
    assert_eq!(
        code(ask(&mut gate, "GET", "/v2/search", Some(&b), NOW)),
        Some(Code::RouteNotLicensed)
    );
    assert_eq!(
        ask(&mut gate, "GET", "/healthz", None, NOW),
        Verdict::Public
    );

    let mut open = config();
    open["unmatched_routes"] = json!("allow");
    let mut gate = gate_with(&open);
    assert_eq!(
        ask(&mut gate, "GET", "/anything", None, NOW),
        Verdict::Public
    );
}

#[test]
fn license_rate_limit_with_retry_after() {
    let k = keys();
    let mut gate = gate();
    let b = format!("Bearer {}", token(&k.ed, &spec("starter", &["search"])));
    for _ in 0..3 {
        assert_eq!(
            ask(&mut gate, "GET", "/v1/search", Some(&b), NOW),
            Verdict::Allow
        );
    }
    let Verdict::Refuse(refusal) = ask(&mut gate, "GET", "/v1/search", Some(&b), NOW) else {
        panic!("the fourth request at once must be refused")
    };
    assert_eq!(refusal.code, Code::RateLimited);
    let limit = refusal.rate_limit.unwrap();
    assert_eq!(limit.wait_nanos, SECOND / 2);
    assert_eq!(limit.retry_after_seconds(), 1);
    // Still refused at the same instant; half a second later one request conforms again.
    assert_ne!(
        ask(&mut gate, "GET", "/v1/search", Some(&b), NOW),
        Verdict::Allow
    );
    let half = NOW * SECOND + SECOND / 2;
    let allowed = gate.admit(
        &RequestHead {
            method: "GET",
            path: "/v1/search",
            credential: Some(&b),
            user: None,
            client_address: None,
        },
        half,
    );
    assert_eq!(allowed.verdict, Verdict::Allow);
}

#[test]
fn feature_rate_limit_and_license_override() {
    let k = keys();
    let mut gate = gate();
    let b = format!(
        "Bearer {}",
        token(&k.ed, &spec("pro", &["search", "design"]))
    );
    assert_eq!(
        ask(&mut gate, "POST", "/v1/design", Some(&b), NOW),
        Verdict::Allow
    );
    assert_eq!(
        code(ask(&mut gate, "POST", "/v1/design", Some(&b), NOW)),
        Some(Code::RateLimited)
    );
    // The plan limits design only: search is unlimited.
    for _ in 0..50 {
        assert_eq!(
            ask(&mut gate, "GET", "/v1/search", Some(&b), NOW),
            Verdict::Allow
        );
    }

    // A license with its own, larger design limit.
    let mut big = spec("pro", &["design"]);
    big.license_id = "lic-big".into();
    big.limits =
        Some(json!({"feature_rate_limits": {"design": {"requests_per_second": 1, "burst": 5}}}));
    let b = format!("Bearer {}", token(&k.ed, &big));
    for _ in 0..5 {
        assert_eq!(
            ask(&mut gate, "POST", "/v1/design", Some(&b), NOW),
            Verdict::Allow
        );
    }
    assert_eq!(
        code(ask(&mut gate, "POST", "/v1/design", Some(&b), NOW)),
        Some(Code::RateLimited)
    );

    // An override naming a feature no route has is not a valid license.
    let mut odd = spec("pro", &["design"]);
    odd.limits = Some(json!({"feature_rate_limits": {"teleport": {"requests_per_second": 1}}}));
    let b = format!("Bearer {}", token(&k.ed, &odd));
    assert_eq!(
        code(ask(&mut gate, "POST", "/v1/design", Some(&b), NOW)),
        Some(Code::InvalidLicense)
    );
}

#[test]
fn a_license_id_cannot_share_another_licenses_feature_bucket() {
    let k = keys();
    let mut gate = gate();
    let a = format!("Bearer {}", token(&k.ed, &spec("pro", &["design"])));
    let mut tricky = spec("pro", &["design"]);
    tricky.license_id = "lic-1/design".into();
    let b = format!("Bearer {}", token(&k.ed, &tricky));
    assert_eq!(
        ask(&mut gate, "POST", "/v1/design", Some(&a), NOW),
        Verdict::Allow
    );
    assert_eq!(
        ask(&mut gate, "POST", "/v1/design", Some(&b), NOW),
        Verdict::Allow
    );
}

#[test]
fn tokens_are_verified_once_and_cached() {
    let k = keys();
    let mut gate = gate();
    let b = format!("Bearer {}", token(&k.rs, &spec("pro", &["search"])));
    for _ in 0..10 {
        assert_eq!(
            ask(&mut gate, "GET", "/v1/search", Some(&b), NOW),
            Verdict::Allow
        );
    }
    let counters = gate.take_counters();
    assert_eq!(
        (counters.token_cache_misses, counters.token_cache_hits),
        (1, 9)
    );
    assert_eq!(gate.cached_tokens(), 1);
}

#[test]
fn token_cache_is_bounded() {
    let k = keys();
    let mut small = config();
    small["token"]["cache_entries"] = json!(4);
    let mut gate = gate_with(&small);
    for i in 0..20 {
        let mut s = spec("pro", &["search"]);
        s.license_id = format!("lic-{i}");
        let b = format!("Bearer {}", token(&k.ed, &s));
        assert_eq!(
            ask(&mut gate, "GET", "/v1/search", Some(&b), NOW),
            Verdict::Allow
        );
        assert!(gate.cached_tokens() <= 4);
    }
}

#[test]
fn a_working_set_as_large_as_the_cache_stays_cached() {
    let k = keys();
    let mut small = config();
    small["token"]["cache_entries"] = json!(4);
    let mut gate = gate_with(&small);
    let tokens: Vec<String> = (0..4)
        .map(|i| {
            let mut s = spec("pro", &["search"]);
            s.license_id = format!("lic-{i}");
            format!("Bearer {}", token(&k.ed, &s))
        })
        .collect();
    for _ in 0..10 {
        for b in &tokens {
            assert_eq!(
                ask(&mut gate, "GET", "/v1/search", Some(b), NOW),
                Verdict::Allow
            );
        }
    }
    let counters = gate.take_counters();
    // Each token verified once; before, promotions swapped generations and 4 tokens in a
    // cache of 4 were verified again on most requests.
    assert_eq!(
        (counters.token_cache_misses, counters.token_cache_hits),
        (4, 36)
    );
}

#[test]
fn a_token_altered_after_it_was_cached_is_verified_not_served_from_the_cache() {
    // The cache keeps a digest of each token, not its text: a token differing in one byte of
    // its signature (or payload) must miss and fail verification.
    let k = keys();
    let mut gate = gate();
    let good = token(&k.ed, &spec("pro", &["search"]));
    let b = format!("Bearer {good}");
    assert_eq!(
        ask(&mut gate, "GET", "/v1/search", Some(&b), NOW),
        Verdict::Allow
    );
    let mut altered = good.into_bytes();
    if let Some(last) = altered.last_mut() {
        *last = if *last == b'A' { b'B' } else { b'A' };
    }
    let altered = format!("Bearer {}", String::from_utf8(altered).unwrap());
    assert!(matches!(
        ask(&mut gate, "GET", "/v1/search", Some(&altered), NOW),
        Verdict::Refuse(_)
    ));
    let counters = gate.take_counters();
    assert_eq!(
        (counters.token_cache_misses, counters.token_cache_hits),
        (2, 0)
    );
}

#[test]
fn malformed_eddsa_tokens_are_refused_as_invalid_tokens() {
    // EdDSA tokens are checked by Tollgate's own decoder (a key decompressed once), not the
    // library's: it must refuse every shape the library refuses.
    let k = keys();
    let good = token(&k.ed, &spec("pro", &["search"]));
    let (signed, signature) = good.rsplit_once('.').unwrap();
    let (header, payload) = signed.split_once('.').unwrap();
    let mut flipped = signature.as_bytes().to_vec();
    flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let cases = [
        format!("{signed}.{signature}.{signature}"),
        format!("{header}.{payload}.{payload}.{signature}"),
        format!("{signed}."),
        format!("{signed}.{}", &signature[..signature.len() - 4]),
        format!("{signed}.{signature}AAAA"),
        format!("{signed}.{flipped}"),
        format!("{header}.e30.{signature}"),
        format!("{signed}.{}", "!".repeat(86)),
    ];
    for case in cases {
        let mut gate = gate();
        assert_eq!(
            code(ask(
                &mut gate,
                "GET",
                "/v1/search",
                Some(&format!("Bearer {case}")),
                NOW
            )),
            Some(Code::InvalidToken),
            "{case}"
        );
    }
    let mut gate = gate();
    assert_eq!(
        ask(
            &mut gate,
            "GET",
            "/v1/search",
            Some(&format!("Bearer {good}")),
            NOW
        ),
        Verdict::Allow
    );
}

#[test]
fn weak_and_off_curve_ed25519_keys_are_refused_in_the_configuration() {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    // The identity point (y = 1) has small order: it would verify forged signatures.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    // y = 2 is not on the curve (no x satisfies the equation).
    let mut off_curve = [0u8; 32];
    off_curve[0] = 2;
    for (x, expected) in [
        (b64(&identity), "weak"),
        (b64(&off_curve), "not a point"),
        (b64(&[7u8; 31]), "32 bytes"),
    ] {
        let mut c = config();
        c["token"]["jwks"] = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x}]});
        let err = Policy::from_json(c.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("token.jwks.keys[0].x"), "{err}");
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
    }
}

#[test]
fn usage_is_aggregated_by_license_feature_and_outcome() {
    let k = keys();
    let mut gate = gate();
    let b = format!("Bearer {}", token(&k.ed, &spec("starter", &["search"])));
    let head = RequestHead {
        method: "GET",
        path: "/v1/search",
        credential: Some(&b),
        user: None,
        client_address: None,
    };
    for _ in 0..5 {
        let admission = gate.admit(&head, NOW * SECOND);
        gate.record(
            &admission,
            UsageTotals {
                calls: 1,
                request_bytes: 7,
                response_bytes: 100,
                processing_nanos: 1000,
            },
        );
    }
    let usage = gate.drain_usage();
    let allowed: Vec<_> = usage
        .iter()
        .filter(|(k, _)| k.outcome == Outcome::Allowed)
        .collect();
    let limited: Vec<_> = usage
        .iter()
        .filter(|(k, _)| k.outcome == Outcome::Refused(Code::RateLimited))
        .collect();
    assert_eq!(allowed.len(), 1);
    assert_eq!(&*allowed[0].0.license, "lic-1");
    assert_eq!(
        allowed[0].1,
        UsageTotals {
            calls: 3,
            request_bytes: 21,
            response_bytes: 300,
            processing_nanos: 3000
        }
    );
    assert_eq!(limited[0].1.calls, 2);
    assert!(gate.drain_usage().is_empty());
}

fn with_collector() -> Value {
    let mut c = config();
    c["collector"] = json!({
        "instance": "node-a/tollgate",
        "key_id": "k1",
        "secret": "0123456789abcdef",
        "retry_initial_ms": 200,
    });
    c
}

#[test]
fn collector_settings_have_their_defaults_and_are_optional() {
    let policy = Policy::from_json(config().to_string().as_bytes()).unwrap();
    assert!(policy.collector.is_none());
    let policy = Policy::from_json(with_collector().to_string().as_bytes()).unwrap();
    let c = policy.collector.unwrap();
    assert_eq!(
        (c.cluster.as_str(), c.authority.as_str(), c.path.as_str()),
        ("tollgate_collector", "tollgate-collector", "/v1/usage")
    );
    assert_eq!(
        (
            c.instance.as_deref(),
            c.key_id.as_str(),
            c.secret.as_slice()
        ),
        (Some("node-a/tollgate"), "k1", &b"0123456789abcdef"[..])
    );
    assert_eq!(c.timeout_ms, 5000);
    // No instance: the filter derives one from the node id when it starts.
    let mut no_instance = with_collector();
    no_instance["collector"]
        .as_object_mut()
        .unwrap()
        .remove("instance");
    let policy = Policy::from_json(no_instance.to_string().as_bytes()).unwrap();
    assert_eq!(policy.collector.unwrap().instance, None);
    assert_eq!(
        c.shipper,
        tollgate_core::shipper::ShipperConfig {
            flush_interval_ms: 1000,
            max_batch_records: 2000,
            max_buffered_records: 200_000,
            retry_initial_ms: 200,
            retry_max_ms: 30_000,
            overflow: tollgate_core::shipper::Overflow::FailClosed,
        }
    );
    let mut open = with_collector();
    open["collector"]["on_buffer_full"] = json!("fail_open");
    let policy = Policy::from_json(open.to_string().as_bytes()).unwrap();
    assert_eq!(
        policy.collector.unwrap().shipper.overflow,
        tollgate_core::shipper::Overflow::FailOpen
    );
}

#[test]
fn a_blocked_gate_refuses_every_request_with_metering_unavailable() {
    let k = keys();
    let mut gate = gate();
    let t = token(&k.ed, &spec("pro", &["search"]));
    gate.set_metering_blocked(true);
    assert!(gate.metering_blocked());
    for (method, path, credential) in [
        ("GET", "/v1/search", Some(format!("Bearer {t}"))),
        ("GET", "/healthz", None),
        ("GET", "/v9/unknown", None),
        ("GET", "/v1/search", None),
    ] {
        let admission = gate.admit(
            &RequestHead {
                method,
                path,
                credential: credential.as_deref(),
                user: None,
                client_address: None,
            },
            NOW * SECOND,
        );
        let Verdict::Refuse(refusal) = &admission.verdict else {
            panic!("{path}: {:?}", admission.verdict);
        };
        assert_eq!(refusal.code, Code::MeteringUnavailable);
        assert_eq!(refusal.status(), 503);
        assert_eq!(
            admission.outcome(),
            Outcome::Refused(Code::MeteringUnavailable)
        );
    }
    // No token was even looked at.
    assert_eq!(gate.take_counters().token_cache_misses, 0);
    gate.set_metering_blocked(false);
    assert_eq!(
        ask(
            &mut gate,
            "GET",
            "/v1/search",
            Some(&format!("Bearer {t}")),
            NOW
        ),
        Verdict::Allow
    );
}

#[test]
fn configuration_errors_name_the_field() {
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"token": {"jwks": {"keys": []}}, "plans": {}, "routes": []}),
            "token.jwks.keys",
        ),
        (
            {
                let mut c = config();
                c["bogus"] = json!(1);
                c
            },
            "unknown field `bogus`",
        ),
        (
            {
                let mut c = config();
                c["plans"]["starter"]["rate_limit"]["burst"] = json!(0);
                c
            },
            "plans.starter.rate_limit.burst",
        ),
        (
            {
                let mut c = config();
                c["plans"]["starter"]["rate_limit"]["requests_per_second"] = json!(-1);
                c
            },
            "plans.starter.rate_limit.requests_per_second",
        ),
        (
            {
                let mut c = config();
                c["plans"]["pro"]["feature_rate_limits"]["nope"] =
                    json!({"requests_per_second": 1});
                c
            },
            "plans.pro.feature_rate_limits.nope",
        ),
        (
            {
                let mut c = config();
                c["plans"] = json!({});
                c
            },
            "`plans`",
        ),
        (
            {
                let mut c = config();
                c["routes"][1] = json!({"prefix": "/x"});
                c
            },
            "routes[1]",
        ),
        (
            {
                let mut c = config();
                c["routes"][1] = json!({"prefix": "x", "feature": "f"});
                c
            },
            // The field the operator wrote, not the one the route compiles to.
            "`routes[1].prefix`: must start with `/`",
        ),
        (
            {
                let mut c = config();
                c["routes"][1] = json!({"path": "x", "feature": "f"});
                c
            },
            "`routes[1].path`: must start with `/`",
        ),
        (
            {
                let mut c = config();
                c["routes"][2]["methods"] = json!(["POST", "GTE"]);
                c
            },
            "`routes[2].methods[1]`: `GTE` is not an HTTP method; use one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH",
        ),
        (
            {
                let mut c = config();
                c["routes"][2]["methods"] = json!(["post"]);
                c
            },
            "`routes[2].methods[0]`: `post` is not an HTTP method",
        ),
        (
            {
                let mut c = config();
                c["token"]["jwks"]["keys"][0]["x"] = json!("AAAA");
                c
            },
            "token.jwks.keys[0].x",
        ),
        (
            {
                let mut c = config();
                c["token"]["jwks"]["keys"][0]["kty"] = json!("oct");
                c
            },
            "token.jwks.keys[0].kty",
        ),
        (
            {
                let mut c = config();
                c["token"]["jwks"]["keys"][1]["alg"] = json!("HS256");
                c
            },
            "token.jwks.keys[1].alg",
        ),
        (
            {
                let mut c = config();
                c["token"]["jwks"]["keys"][2]["alg"] = json!("ES256");
                c
            },
            "token.jwks.keys[2].alg",
        ),
        (
            {
                let mut c = config();
                c["token"]["jwks"]["keys"][1]["kid"] = json!("ed-1");
                c
            },
            "token.jwks.keys[1].kid",
        ),
        (
            {
                let mut c = config();
                c["token"]["leeway_seconds"] = json!("soon");
                c
            },
            "token.leeway_seconds",
        ),
        (
            {
                let mut c = config();
                c["stats_flush_interval_ms"] = json!(4_294_967_296u64);
                c
            },
            "stats_flush_interval_ms",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["bogus"] = json!(1);
                c
            },
            "unknown field `bogus`",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"].as_object_mut().unwrap().remove("key_id");
                c
            },
            "missing field `key_id`",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"].as_object_mut().unwrap().remove("secret");
                c
            },
            "missing field `secret`",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["instance"] = json!("node a");
                c
            },
            "collector.instance",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["instance"] = json!("x".repeat(129));
                c
            },
            "collector.instance",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["key_id"] = json!("");
                c
            },
            "collector.key_id",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["secret"] = json!("too-short");
                c
            },
            "collector.secret",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["cluster"] = json!("");
                c
            },
            "collector.cluster",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["authority"] = json!("a b");
                c
            },
            "collector.authority",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["path"] = json!("v1/usage");
                c
            },
            "collector.path",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["flush_interval_ms"] = json!(0);
                c
            },
            "collector.flush_interval_ms",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["max_batch_records"] = json!(0);
                c
            },
            "collector.max_batch_records",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["max_batch_records"] = json!(3001);
                c
            },
            "collector.max_batch_records",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["max_buffered_records"] = json!(0);
                c
            },
            "collector.max_buffered_records",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["timeout_ms"] = json!(0);
                c
            },
            "collector.timeout_ms",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["retry_initial_ms"] = json!(0);
                c
            },
            "collector.retry_initial_ms",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["retry_max_ms"] = json!(100);
                c
            },
            "collector.retry_max_ms",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["on_buffer_full"] = json!("drop");
                c
            },
            "collector.on_buffer_full",
        ),
        (
            {
                let mut c = with_collector();
                c["collector"]["timeout_ms"] = json!("soon");
                c
            },
            "collector.timeout_ms",
        ),
    ];
    for (config, expected) in cases {
        let err = Policy::from_json(config.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
    }
    for junk in [
        &b""[..],
        b"{",
        b"null",
        b"[]",
        b"\xff\xfe",
        b"{\"token\": 1}",
    ] {
        assert!(Policy::from_json(junk).is_err());
    }
}

#[test]
fn json_syntax_errors_say_where_by_line_and_column() {
    let text = "{\n  \"token\": {\n    \"header\": \"authorization\",\n  }\n}\n";
    let err = Policy::from_json(text.as_bytes()).unwrap_err();
    assert_eq!(err.field, "");
    assert_eq!(
        err.to_string(),
        "invalid configuration: not valid JSON at line 4, column 3: trailing comma"
    );
    // Cut short, and junk after the configuration: the place again, never a field `?`.
    for (junk, place) in [
        (&b"{\"token\": {\"header\": "[..], "line 1, column 21"),
        (b"{\"plans\": {\"a\" 1}}", "line 1, column 16"),
    ] {
        let err = Policy::from_json(junk).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid configuration: not valid JSON at ") && err.contains(place),
            "{err}"
        );
        assert!(!err.contains('?'), "{err}");
    }
    let trailing = format!("{}\n x", config());
    let err = Policy::from_json(trailing.as_bytes())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not valid JSON at line 2, column 2: trailing characters"),
        "{err}"
    );
    // A value of the wrong type is still named by its field.
    let mut c = config();
    c["token"]["leeway_seconds"] = json!("soon");
    let err = Policy::from_json(c.to_string().as_bytes()).unwrap_err();
    assert_eq!(err.field, "token.leeway_seconds");
}

#[test]
fn routes_that_can_never_match_are_accepted_with_a_warning() {
    let fields = |routes: Value| -> Vec<(String, String)> {
        let mut c = config();
        c["routes"] = routes;
        c["plans"]["pro"] = json!({});
        Policy::from_json(c.to_string().as_bytes())
            .unwrap()
            .warnings()
            .iter()
            .map(|w| (w.field.clone(), w.to_string()))
            .collect()
    };
    // The shipped-style table: nothing shadowed.
    assert!(Policy::from_json(config().to_string().as_bytes())
        .unwrap()
        .warnings()
        .is_empty());
    // A broad prefix before a narrower one, every method: the later route is dead.
    let dead = fields(json!([
        {"prefix": "/v1/", "feature": "search"},
        {"prefix": "/v1/design", "methods": ["POST"], "feature": "design"},
        {"path": "/v1/search/all", "feature": "search"},
        {"prefix": "/v2/", "feature": "search"},
    ]));
    assert_eq!(
        dead.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(),
        ["routes[1]", "routes[2]"]
    );
    assert_eq!(
        dead[0].1,
        "configuration warning at `routes[1]`: can never match: routes[0] comes first and matches every path and method it does"
    );
    // Methods: an earlier route for the same methods shadows; for other methods it does not;
    // for some of them it shadows those.
    let by_method = fields(json!([
        {"prefix": "/v1/design", "methods": ["POST"], "feature": "design"},
        {"prefix": "/v1/design/run", "methods": ["POST"], "feature": "design"},
        {"prefix": "/v1/design/run", "methods": ["GET"], "feature": "search"},
        {"path": "/v1/design/run/x", "methods": ["GET", "PUT"], "feature": "search"},
        {"prefix": "/v1/design/", "feature": "search"},
    ]));
    assert_eq!(by_method.len(), 2, "{by_method:?}");
    assert_eq!(by_method[0].0, "routes[1]");
    assert_eq!(
        by_method[0].1,
        "configuration warning at `routes[1]`: can never match: routes[0] comes first and matches its paths for POST"
    );
    assert_eq!(by_method[1].0, "routes[3]");
    assert_eq!(
        by_method[1].1,
        "configuration warning at `routes[3]`: never matches GET: routes[2] comes first and matches its paths for it"
    );
    // routes[2] (GET where earlier routes take POST) and routes[4] (every method after a
    // route for POST: the other methods still reach it) are live.
}

#[test]
fn a_path_served_for_other_methods_is_405_with_allow() {
    let k = keys();
    let mut gate = gate();
    let b = format!("Bearer {}", token(&k.ed, &spec("pro", &["design"])));
    let Verdict::Refuse(refusal) = ask(&mut gate, "GET", "/v1/design/run?x=1", Some(&b), NOW)
    else {
        panic!("GET on a POST-only route must be refused")
    };
    assert_eq!(refusal.code, Code::MethodNotAllowed);
    assert_eq!(refusal.status(), 405);
    assert_eq!(refusal.allow.as_deref(), Some("POST"));
    let headers = refusal.headers();
    assert!(
        headers.iter().any(|(k, v)| *k == "allow" && v == "POST"),
        "{headers:?}"
    );
    // Decided before the token: a request without one gets the same answer.
    assert_eq!(
        code(ask(&mut gate, "DELETE", "/v1/design", None, NOW)),
        Some(Code::MethodNotAllowed)
    );
    // No route for the path at all: still route_not_licensed.
    assert_eq!(
        code(ask(&mut gate, "GET", "/v2/design", Some(&b), NOW)),
        Some(Code::RouteNotLicensed)
    );
    // Several routes for the path: every method they take, in configuration order.
    let mut c = config();
    c["routes"] = json!([
        {"prefix": "/v1/design/", "methods": ["PUT", "POST"], "feature": "design"},
        {"path": "/v1/design/run", "methods": ["POST", "DELETE"], "feature": "design"},
    ]);
    c["plans"]["pro"] = json!({});
    let mut gate = gate_with(&c);
    let Verdict::Refuse(refusal) = ask(&mut gate, "GET", "/v1/design/run", Some(&b), NOW) else {
        panic!("GET must be refused")
    };
    assert_eq!(refusal.allow.as_deref(), Some("PUT, POST, DELETE"));
    // With `unmatched_routes: allow` a request no route takes passes, whatever its method.
    let mut open = config();
    open["unmatched_routes"] = json!("allow");
    let mut gate = gate_with(&open);
    assert_eq!(
        ask(&mut gate, "GET", "/v1/design/run", None, NOW),
        Verdict::Public
    );
}

#[test]
fn the_token_header_is_removed_upstream_unless_configured_to_stay() {
    let k = keys();
    let b = format!("Bearer {}", token(&k.ed, &spec("starter", &["search"])));
    let head = RequestHead {
        method: "GET",
        path: "/v1/search",
        credential: Some(&b),
        user: None,
        client_address: None,
    };
    let mut gate = gate();
    let allowed = gate.admit(&head, NOW * SECOND);
    assert_eq!(allowed.verdict, Verdict::Allow);
    assert_eq!(
        allowed.upstream_removals(gate.policy()),
        Some("authorization")
    );
    // Public routes are not the filter's business: whatever they carry stays.
    let public = gate.admit(
        &RequestHead {
            path: "/healthz",
            ..head
        },
        NOW * SECOND,
    );
    assert_eq!(public.upstream_removals(gate.policy()), None);

    let mut c = config();
    c["token"]["header"] = json!("X-License");
    let mut gate = gate_with(&c);
    let allowed = gate.admit(&head, NOW * SECOND);
    assert_eq!(allowed.upstream_removals(gate.policy()), Some("x-license"));

    let mut c = config();
    c["token"]["strip_from_upstream"] = json!(false);
    let mut gate = gate_with(&c);
    let allowed = gate.admit(&head, NOW * SECOND);
    assert_eq!(allowed.verdict, Verdict::Allow);
    assert_eq!(allowed.upstream_removals(gate.policy()), None);
}

#[test]
fn allowed_responses_carry_ratelimit_headers_for_rate_limits() {
    let k = keys();
    let b = format!("Bearer {}", token(&k.ed, &spec("starter", &["search"])));
    let at = |gate: &mut Gate<Rc<MemoryCells>>, path: &str, nanos: u64| {
        gate.admit(
            &RequestHead {
                method: if path.starts_with("/v1/design") {
                    "POST"
                } else {
                    "GET"
                },
                path,
                credential: Some(&b),
                user: None,
                client_address: None,
            },
            nanos,
        )
    };
    let header = |admission: &tollgate_core::Admission, name: &str| {
        admission
            .ratelimit_headers()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    };
    // starter: 2 per second, burst 3 (w: 1.5 s to refill the burst, rounded up).
    let mut gate = gate();
    let first = at(&mut gate, "/v1/search", NOW * SECOND);
    assert_eq!(first.verdict, Verdict::Allow);
    assert_eq!(
        header(&first, "ratelimit-policy").as_deref(),
        Some("\"license\";q=3;w=2")
    );
    assert_eq!(
        header(&first, "ratelimit").as_deref(),
        Some("\"license\";r=2;t=1")
    );
    let third = {
        at(&mut gate, "/v1/search", NOW * SECOND);
        at(&mut gate, "/v1/search", NOW * SECOND)
    };
    assert_eq!(
        header(&third, "ratelimit").as_deref(),
        Some("\"license\";r=0;t=2")
    );
    // A public route has none.
    let public = gate.admit(
        &RequestHead {
            method: "GET",
            path: "/healthz",
            credential: None,
            user: None,
            client_address: None,
        },
        NOW * SECOND,
    );
    assert!(public.ratelimit_headers().is_empty());

    // License and feature limits: license first, then feature.
    let mut c = config();
    c["plans"]["starter"]["feature_rate_limits"] =
        json!({"search": {"requests_per_second": 1, "burst": 2}});
    let mut gate = gate_with(&c);
    let both = at(&mut gate, "/v1/search", NOW * SECOND);
    assert_eq!(
        header(&both, "ratelimit-policy").as_deref(),
        Some("\"license\";q=3;w=2, \"feature\";q=2;w=2")
    );
    assert_eq!(
        header(&both, "ratelimit").as_deref(),
        Some("\"license\";r=2;t=1, \"feature\";r=1;t=1")
    );

    // A plan without limits: no headers at all.
    let mut c = config();
    c["plans"]["starter"] = json!({});
    let mut gate = gate_with(&c);
    assert!(at(&mut gate, "/v1/search", NOW * SECOND)
        .ratelimit_headers()
        .is_empty());

    // Turned off: rate limits are still enforced, but allowed answers say nothing of them.
    let mut c = config();
    c["rate_limit_headers"] = json!(false);
    let mut gate = gate_with(&c);
    for _ in 0..3 {
        let allowed = at(&mut gate, "/v1/search", NOW * SECOND);
        assert_eq!(allowed.verdict, Verdict::Allow);
        assert!(allowed.ratelimit_headers().is_empty());
    }
    assert_eq!(
        code(at(&mut gate, "/v1/search", NOW * SECOND).verdict),
        Some(Code::RateLimited)
    );
}

#[test]
fn quotas_come_from_the_plan_and_the_license_and_need_a_collector() {
    use tollgate_wire::sync::Period;
    use tollgate_wire::Meter;

    let mut c = with_collector();
    c["plans"]["pro"]["quotas"] = json!({
        "calls": {"per": "day", "limit": 1000},
        "response_bytes": {"per": "month", "limit": 5_000_000_000u64}
    });
    let policy = Policy::from_json(c.to_string().as_bytes()).unwrap();
    let quotas = &policy.plans["pro"].limits.quotas;
    assert_eq!(quotas[&Meter::Calls].limit, 1000);
    assert_eq!(quotas[&Meter::Calls].per, Period::Day);
    assert_eq!(quotas[&Meter::ResponseBytes].per, Period::Month);
    // Defaults: 5% leases, 64 KiB reservations for bytes, 429, deny without a collector.
    let q = &policy.quota;
    assert_eq!(q.lease_want(1000), 50);
    assert_eq!(q.lease_want(3), 1);
    assert_eq!(q.reserve[&Meter::Calls], 1);
    assert_eq!(q.reserve[&Meter::ResponseBytes], 65_536);
    assert_eq!(q.exhausted_status, 429);

    let mut errors = Vec::new();
    let mut no_collector = c.clone();
    no_collector.as_object_mut().unwrap().remove("collector");
    errors.push((no_collector, "plans.pro.quotas"));
    let mut zero = c.clone();
    zero["plans"]["pro"]["quotas"]["calls"]["limit"] = json!(0);
    errors.push((zero, "plans.pro.quotas.calls.limit"));
    let mut status = c.clone();
    status["quota"] = json!({"exhausted_status": 403});
    errors.push((status, "quota.exhausted_status"));
    let mut fraction = c.clone();
    fraction["quota"] = json!({"lease_fraction": 0});
    errors.push((fraction, "quota.lease_fraction"));
    let mut meter = c.clone();
    meter["plans"]["pro"]["quotas"] = json!({"clicks": {"per": "day", "limit": 1}});
    errors.push((meter, "plans.pro.quotas"));
    let mut period = c.clone();
    period["plans"]["pro"]["quotas"]["calls"]["per"] = json!("week");
    errors.push((period, "plans.pro.quotas.calls.per"));
    for (config, field) in errors {
        let e = Policy::from_json(config.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
}

/// A gate whose `pro` plan has a quota of `limit` calls a day, with `quota` settings.
fn quota_gate(limit: u64, quota: Value) -> Gate<Rc<MemoryCells>> {
    let mut c = with_collector();
    c["plans"]["pro"]["quotas"] = json!({"calls": {"per": "day", "limit": limit}});
    c["quota"] = quota;
    gate_with(&c)
}

fn admit_at(gate: &mut Gate<Rc<MemoryCells>>, token: &str, at_ms: u64) -> tollgate_core::Admission {
    let credential = format!("Bearer {token}");
    gate.admit(
        &RequestHead {
            method: "GET",
            path: "/v1/search",
            credential: Some(&credential),
            user: None,
            client_address: None,
        },
        at_ms * 1_000_000,
    )
}

fn grant_sync(
    gate: &mut Gate<Rc<MemoryCells>>,
    granted: u64,
    now_ms: u64,
) -> tollgate_core::gate::SyncWork {
    use tollgate_wire::sync::{LeaseGrant, SyncResponse};
    let work = gate.sync_work(now_ms);
    let response = SyncResponse {
        seats: Vec::new(),
        version: 1,
        grants: work
            .leases
            .iter()
            .map(|l| LeaseGrant {
                lease_id: l.lease_id.clone(),
                granted,
                period_start_ms: now_ms - 1000,
                period_end_ms: now_ms + 60_000,
                expires_ms: now_ms + 10_000,
                allocated: granted,
            })
            .collect(),
        closed: work.returns.iter().map(|r| r.lease_id.clone()).collect(),
        denials: vec![],
    };
    gate.apply_sync(&work, &response, now_ms);
    work
}

#[test]
fn quota_admissions_wait_for_a_lease_then_take_from_it_and_commit_at_the_end() {
    let k = keys();
    let t = token(&k.ed, &spec("pro", &["search"]));
    let mut gate = quota_gate(100, json!({"lease_fraction": 0.03}));
    let now = NOW * 1000;
    let mut waiting = admit_at(&mut gate, &t, now);
    assert_eq!(waiting.verdict, Verdict::AwaitCollector);
    // Never decided (the client left): metered as refused, not as served.
    assert_eq!(waiting.outcome(), Outcome::Refused(Code::QuotaUnavailable));
    let work = grant_sync(&mut gate, 3, now);
    assert_eq!(work.leases.len(), 1);
    assert_eq!(work.leases[0].want, 3);
    gate.retry_held(&mut waiting, now, false);
    assert_eq!(waiting.verdict, Verdict::Allow);
    assert_eq!(waiting.holds.len(), 1);
    gate.record(
        &waiting,
        UsageTotals {
            calls: 1,
            ..Default::default()
        },
    );
    for _ in 0..2 {
        let a = admit_at(&mut gate, &t, now);
        assert_eq!(a.verdict, Verdict::Allow);
        gate.record(
            &a,
            UsageTotals {
                calls: 1,
                ..Default::default()
            },
        );
    }
    // Used up: the next waits; the lease goes back with all 3 used; nothing more: exhausted.
    assert_eq!(
        admit_at(&mut gate, &t, now).verdict,
        Verdict::AwaitCollector
    );
    let work = grant_sync(&mut gate, 0, now + 1);
    assert_eq!(work.returns.len(), 1);
    assert_eq!(work.returns[0].used, 3);
    match admit_at(&mut gate, &t, now + 2).verdict {
        Verdict::Refuse(r) => {
            assert_eq!(r.code, Code::QuotaExhausted);
            assert_eq!(r.status(), 429);
            assert_eq!(r.quota.unwrap().retry_after_seconds, 60);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn without_a_collector_quotas_deny_or_allow_a_fixed_allowance() {
    let k = keys();
    let t = token(&k.ed, &spec("pro", &["search"]));
    let now = NOW * 1000;
    // deny (the default): a request that waited long enough gets 503 quota_unavailable.
    let mut gate = quota_gate(100, json!({}));
    let mut waiting = admit_at(&mut gate, &t, now);
    gate.retry_held(&mut waiting, now + 2000, true);
    assert_eq!(code(waiting.verdict.clone()), Some(Code::QuotaUnavailable));
    // allow, with an allowance of 2: two admitted, then 503; the units are reported with the
    // next return once the collector grants a lease again.
    let mut gate = quota_gate(
        100,
        json!({"without_collector": "allow", "allowance": 2, "exhausted_status": 402}),
    );
    let mut verdicts = Vec::new();
    for _ in 0..3 {
        let mut a = admit_at(&mut gate, &t, now);
        gate.retry_held(&mut a, now + 2000, true);
        if a.verdict == Verdict::Allow {
            gate.record(
                &a,
                UsageTotals {
                    calls: 1,
                    ..Default::default()
                },
            );
        }
        verdicts.push(code(a.verdict));
    }
    assert_eq!(verdicts, vec![None, None, Some(Code::QuotaUnavailable)]);
    grant_sync(&mut gate, 1, now + 3000);
    let a = admit_at(&mut gate, &t, now + 3000);
    gate.record(
        &a,
        UsageTotals {
            calls: 1,
            ..Default::default()
        },
    );
    let work = grant_sync(&mut gate, 0, now + 4000);
    assert_eq!(
        work.returns[0].used,
        1 + 2,
        "the lease's call and the allowance's two"
    );
    // And exhaustion answers with the configured 402.
    match admit_at(&mut gate, &t, now + 4001).verdict {
        Verdict::Refuse(r) => assert_eq!((r.code, r.status()), (Code::QuotaExhausted, 402)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn keys_fetched_from_a_jwks_endpoint_verify_tokens_and_a_changed_set_takes_effect_at_once() {
    let k = keys();
    let mut c = config();
    c["token"].as_object_mut().unwrap().remove("jwks");
    c["token"]["jwks_source"] = json!({"cluster": "collector", "refresh_seconds": 60});
    let cells = Rc::new(MemoryCells::default());
    let policy = Arc::new(Policy::from_json(c.to_string().as_bytes()).unwrap());
    let mut gate = Gate::new(Arc::clone(&policy), Rc::clone(&cells));
    let ed = token(&k.ed, &spec("starter", &["search"]));
    let es = token(&k.es, &spec("starter", &["search"]));
    let now_ms = NOW * 1000;

    // Nothing fetched yet: 503, not a 401 the client would take for a bad license.
    assert_eq!(
        code(ask(
            &mut gate,
            "GET",
            "/v1/search",
            Some(&format!("Bearer {ed}")),
            NOW
        )),
        Some(Code::KeysUnavailable)
    );
    let source = gate.jwks_due(now_ms).expect("a fetch is due at start");
    assert_eq!(source.path, "/.well-known/jwks.json");
    gate.jwks_started(true, now_ms);
    let only_ed = jwks([&k.ed]).to_string();
    gate.jwks_answered(Some((200, only_ed.as_bytes())), now_ms);
    assert_eq!(
        ask(
            &mut gate,
            "GET",
            "/v1/search",
            Some(&format!("Bearer {ed}")),
            NOW
        ),
        Verdict::Allow
    );
    // A kid the set lacks is refused and asks for a refetch (not before min_refetch_seconds).
    assert_eq!(
        code(ask(
            &mut gate,
            "GET",
            "/v1/search",
            Some(&format!("Bearer {es}")),
            NOW
        )),
        Some(Code::InvalidToken)
    );
    assert!(gate.jwks_due(now_ms + 1000).is_none());
    assert!(gate.jwks_due(now_ms + 10_000).is_some());
    gate.jwks_started(true, now_ms + 10_000);
    let rotated = jwks([&k.es]).to_string();
    gate.jwks_answered(Some((200, rotated.as_bytes())), now_ms + 10_000);
    assert_eq!(
        ask(
            &mut gate,
            "GET",
            "/v1/search",
            Some(&format!("Bearer {es}")),
            NOW + 10
        ),
        Verdict::Allow
    );
    // The Ed25519 key left the set: its token, verified and cached before, is refused now.
    assert_eq!(
        code(ask(
            &mut gate,
            "GET",
            "/v1/search",
            Some(&format!("Bearer {ed}")),
            NOW + 10
        )),
        Some(Code::InvalidToken)
    );
    // Another worker's (or the next VM's) gate starts with the stored set, without a fetch.
    let mut next = Gate::new(policy, Rc::clone(&cells));
    assert!(next.jwks_due(now_ms + 11_000).is_none());
    assert_eq!(
        ask(
            &mut next,
            "GET",
            "/v1/search",
            Some(&format!("Bearer {es}")),
            NOW + 11
        ),
        Verdict::Allow
    );
}

const PSEUDONYM_SECRET: &str = "pseudonym-secret-0123456789abcdef";

/// A gate whose `pro` plan has `seats`, users named by the `x-end-user` header.
fn seat_gate(seats: Value, quota: Value) -> Gate<Rc<MemoryCells>> {
    let mut c = with_collector();
    c["pseudonyms"] = json!({"key_id": "k2026", "secret": PSEUDONYM_SECRET});
    c["users"] = json!({"header": "X-End-User"});
    c["plans"]["pro"]["seats"] = seats;
    c["quota"] = quota;
    gate_with(&c)
}

fn admit_user(
    gate: &mut Gate<Rc<MemoryCells>>,
    token: &str,
    user: Option<&str>,
    client_address: Option<&str>,
    at_ms: u64,
) -> tollgate_core::Admission {
    let credential = format!("Bearer {token}");
    gate.admit(
        &RequestHead {
            method: "GET",
            path: "/v1/search",
            credential: Some(&credential),
            user,
            client_address,
        },
        at_ms * 1_000_000,
    )
}

/// Answer a sync's seat asks: grant the users in `granted`, refuse the others.
fn seat_sync(
    gate: &mut Gate<Rc<MemoryCells>>,
    granted: &[&str],
    now_ms: u64,
) -> tollgate_core::gate::SyncWork {
    use tollgate_wire::sync::{SeatAnswer, SyncResponse};
    let pseudonyms = Arc::clone(gate.policy());
    let pseudonyms = pseudonyms.pseudonyms.as_ref().unwrap();
    let work = gate.sync_work(now_ms);
    let seats = work
        .seats
        .iter()
        .map(|ask| {
            let yes = granted.iter().any(|u| {
                pseudonyms.pseudonym(tollgate_core::pseudonym::Subject::User, u) == ask.user
            });
            SeatAnswer {
                license: ask.license.clone(),
                user: ask.user.clone(),
                granted: yes,
                until_ms: now_ms + if yes { 10_000 } else { 60_000 },
                in_use: 2,
                limit: ask.rule.limit(),
            }
        })
        .collect();
    let response = SyncResponse {
        version: 1,
        grants: vec![],
        closed: vec![],
        denials: vec![],
        seats,
    };
    gate.apply_sync(&work, &response, now_ms);
    work
}

#[test]
fn seats_hold_a_new_user_for_the_collector_then_admit_holders_and_refuse_the_rest() {
    let k = keys();
    let t = token(&k.ed, &spec("pro", &["search"]));
    let mut gate = seat_gate(json!({"floating": 2, "window_seconds": 60}), json!({}));
    let now = NOW * 1000;

    // A user without a seat waits for the collector; the ask carries only a pseudonym.
    let mut alice = admit_user(&mut gate, &t, Some("alice@example.com"), None, now);
    assert_eq!(alice.verdict, Verdict::AwaitCollector);
    let mut carol = admit_user(&mut gate, &t, Some("carol@example.com"), None, now);
    let work = seat_sync(&mut gate, &["alice@example.com"], now + 5);
    assert_eq!(work.seats.len(), 2);
    for ask in &work.seats {
        assert!(
            ask.user.starts_with("k2026.") && !ask.user.contains('@'),
            "{}",
            ask.user
        );
        assert_eq!(ask.license, "lic-1");
        assert_eq!(
            ask.rule,
            tollgate_wire::sync::SeatRule::Floating {
                limit: 2,
                window_ms: 60_000
            }
        );
    }
    gate.retry_held(&mut alice, now + 5, false);
    assert_eq!(alice.verdict, Verdict::Allow);
    gate.retry_held(&mut carol, now + 5, false);
    match &carol.verdict {
        Verdict::Refuse(r) => {
            assert_eq!(r.code, Code::SeatLimitReached);
            assert_eq!(r.status(), 403);
            assert_eq!(r.retry_after_seconds, Some(60));
            assert!(r.message.contains("all 2 seats"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
    // Decided locally from now on: alice is served at once, carol refused at once, and
    // neither asks the collector again.
    assert_eq!(
        admit_user(&mut gate, &t, Some("alice@example.com"), None, now + 10).verdict,
        Verdict::Allow
    );
    assert_eq!(
        code(admit_user(&mut gate, &t, Some("carol@example.com"), None, now + 10).verdict),
        Some(Code::SeatLimitReached)
    );
    assert!(gate.sync_work(now + 20).seats.is_empty());
    // In the grant's second half, one request renews alice's seat (and is served meanwhile).
    assert_eq!(
        admit_user(&mut gate, &t, Some("alice@example.com"), None, now + 6_000).verdict,
        Verdict::Allow
    );
    assert_eq!(
        admit_user(&mut gate, &t, Some("alice@example.com"), None, now + 6_001).verdict,
        Verdict::Allow
    );
    let work = seat_sync(&mut gate, &["alice@example.com"], now + 6_010);
    assert_eq!(work.seats.len(), 1);
    // No user: 403 missing_user (the token is fine: no WWW-Authenticate), before anything
    // is asked.
    let none = admit_user(&mut gate, &t, None, None, now + 6_020);
    assert_eq!(code(none.verdict.clone()), Some(Code::MissingUser));
    assert_eq!(Code::MissingUser.status(), 403);

    // Usage is metered per user, pseudonymised.
    gate.record(
        &alice,
        UsageTotals {
            calls: 1,
            ..Default::default()
        },
    );
    let usage = gate.drain_usage();
    let users: Vec<_> = usage.iter().map(|(k, _)| k.user.clone()).collect();
    assert_eq!(users.len(), 1);
    let user = users[0].clone().unwrap();
    assert!(user.starts_with("k2026.") && !user.contains("alice"));
}

#[test]
fn a_request_held_for_a_seat_obeys_a_denial_the_sync_brings() {
    use tollgate_wire::sync::{Denial, DenialCode, SyncResponse};
    let k = keys();
    let t = token(&k.ed, &spec("pro", &["search"]));
    let now = NOW * 1000;
    let mut gate = seat_gate(json!({"named": 2}), json!({"without_collector": "allow"}));
    let mut waiting = admit_user(&mut gate, &t, Some("erin"), None, now);
    assert_eq!(waiting.verdict, Verdict::AwaitCollector);
    // Left before it was decided: metered as never served, for want of a seat.
    assert_eq!(waiting.outcome(), Outcome::Refused(Code::SeatUnavailable));
    // The collector revoked the license meanwhile: no seat answer, a denial.
    let work = gate.sync_work(now);
    let response = SyncResponse {
        version: 1,
        grants: vec![],
        closed: vec![],
        seats: vec![],
        denials: vec![Denial {
            account: "acct-1".into(),
            license: "lic-1".into(),
            code: DenialCode::LicenseRevoked,
            message: "license lic-1 was revoked: fraud".into(),
            until_ms: None,
        }],
    };
    gate.apply_sync(&work, &response, now + 5);
    // Refused with the denial, even under `without_collector: allow` once it waited long.
    gate.retry_held(&mut waiting, now + 5_000, true);
    assert_eq!(code(waiting.verdict), Some(Code::LicenseRevoked));
}

#[test]
fn a_license_cannot_ask_for_seats_where_users_are_not_told_apart() {
    let k = keys();
    let mut gate = gate_with(&with_collector());
    let mut s = spec("pro", &["search"]);
    s.limits = Some(json!({"seats": {"named": 3}}));
    let a = admit_user(&mut gate, &token(&k.ed, &s), Some("u"), None, NOW * 1000);
    assert_eq!(code(a.verdict), Some(Code::InvalidLicense));
}

#[test]
fn a_sync_carries_a_bounded_number_of_client_pseudonyms() {
    let k = keys();
    let mut c = with_collector();
    c["pseudonyms"] = json!({"key_id": "k2026", "secret": PSEUDONYM_SECRET});
    c["plans"]["pro"]["sharing"] = json!({"max_clients": 2});
    let mut gate = gate_with(&c);
    // 60 licenses, each used from 200 addresses: 12,000 pseudonyms noted.
    for license in 0..60 {
        let mut s = spec("pro", &["search"]);
        s.license_id = format!("lic-{license}");
        let t = token(&k.ed, &s);
        for client in 0..200 {
            let address = format!("10.0.{license}.{client}");
            admit_user(&mut gate, &t, None, Some(&address), NOW * 1000);
        }
    }
    let mut total = 0;
    for round in 0..3 {
        let work = gate.sync_work(NOW * 1000 + round);
        let ids: usize = work.clients.iter().map(|c| c.clients.len()).sum();
        assert!(ids <= 8_000, "{ids} client ids in one sync");
        // And the collector takes it.
        let request = tollgate_wire::sync::SyncRequest {
            version: 1,
            instance: "node".into(),
            leases: work.leases,
            returns: work.returns,
            licenses: work.licenses,
            seats: work.seats,
            clients: work.clients,
        };
        assert!(tollgate_wire::sync::SyncRequest::decode(&request.encode()).is_ok());
        total += ids;
    }
    assert_eq!(total, 12_000, "every pseudonym goes, over several syncs");
}

#[test]
fn a_seat_ask_the_collector_never_answers_follows_without_collector() {
    let k = keys();
    let t = token(&k.ed, &spec("pro", &["search"]));
    let now = NOW * 1000;
    let mut gate = seat_gate(json!({"named": 1, "per": "month"}), json!({}));
    let mut waiting = admit_user(&mut gate, &t, Some("dan"), None, now);
    // The sync fails: the ask is forgotten, so the next check asks again.
    let work = gate.sync_work(now);
    assert_eq!(work.seats.len(), 1);
    gate.sync_failed(work, now);
    gate.retry_held(&mut waiting, now + 10, false);
    assert_eq!(waiting.verdict, Verdict::AwaitCollector);
    assert_eq!(gate.sync_work(now + 10).seats.len(), 1);
    // Waited long enough: deny (the default) is 503 seat_unavailable...
    gate.retry_held(&mut waiting, now + 2_000, true);
    assert_eq!(code(waiting.verdict.clone()), Some(Code::SeatUnavailable));
    // ... and allow admits.
    let mut gate = seat_gate(json!({"named": 1}), json!({"without_collector": "allow"}));
    let mut waiting = admit_user(&mut gate, &t, Some("dan"), None, now);
    gate.retry_held(&mut waiting, now + 2_000, true);
    assert_eq!(waiting.verdict, Verdict::Allow);
}

#[test]
fn a_user_claim_is_pseudonymised_when_the_token_is_verified() {
    let k = keys();
    let mut c = with_collector();
    c["pseudonyms"] = json!({"key_id": "k2026", "secret": PSEUDONYM_SECRET});
    c["users"] = json!({"claim": "uid"});
    c["plans"]["pro"]["seats"] = json!({"named": 5});
    let mut gate = gate_with(&c);
    let mut claims = spec("pro", &["search"]).claims_at(NOW);
    claims["uid"] = json!("u-1234");
    let t = k.ed.sign(&claims).unwrap();
    let a = admit_user(
        &mut gate,
        &t,
        Some("ignored: users come from the claim"),
        None,
        NOW * 1000,
    );
    let expected = tollgate_core::pseudonym::Pseudonymizer::new("p", "k2026", PSEUDONYM_SECRET)
        .unwrap()
        .pseudonym(tollgate_core::pseudonym::Subject::User, "u-1234");
    assert_eq!(a.user.as_deref(), Some(expected.as_str()));
    assert_eq!(a.verdict, Verdict::AwaitCollector);
    // A token without the claim names no user: seats need one.
    let t = token(&k.ed, &spec("pro", &["search"]));
    let a = admit_user(&mut gate, &t, None, None, NOW * 1000);
    assert_eq!(code(a.verdict), Some(Code::MissingUser));
}

#[test]
fn clients_of_a_sharing_plan_go_to_the_collector_pseudonymised_and_a_block_refuses() {
    use tollgate_wire::sync::{Denial, DenialCode, SyncResponse};
    let k = keys();
    let mut c = with_collector();
    c["pseudonyms"] = json!({"key_id": "k2026", "secret": PSEUDONYM_SECRET});
    c["plans"]["pro"]["sharing"] = json!({"max_clients": 2, "window_seconds": 600, "block": true});
    let mut gate = gate_with(&c);
    assert!(gate.policy().reads_client_address);
    let t = token(&k.ed, &spec("pro", &["search"]));
    let now = NOW * 1000;
    for address in ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.3"] {
        let a = admit_user(&mut gate, &t, None, Some(address), now);
        assert_eq!(a.verdict, Verdict::Allow);
    }
    let work = gate.sync_work(now);
    assert_eq!(work.clients.len(), 1);
    let seen = &work.clients[0];
    assert_eq!(
        (seen.max_clients, seen.window_ms, seen.block),
        (2, 600_000, true)
    );
    assert_eq!(seen.clients.len(), 3);
    assert!(seen
        .clients
        .iter()
        .all(|c| c.starts_with("k2026.") && !c.contains("10.0")));
    let response = SyncResponse {
        version: 1,
        grants: vec![],
        closed: vec![],
        seats: vec![],
        denials: vec![Denial {
            account: "acct-1".into(),
            license: "lic-1".into(),
            code: DenialCode::LicenseSharingDetected,
            message: "license lic-1 was used from 3 distinct clients".into(),
            until_ms: Some(now + 600_000),
        }],
    };
    gate.apply_sync(&work, &response, now);
    match admit_user(&mut gate, &t, None, Some("10.0.0.1"), now + 1).verdict {
        Verdict::Refuse(r) => {
            assert_eq!(r.code, Code::LicenseSharingDetected);
            assert_eq!(r.status(), 403);
            assert_eq!(r.retry_after_seconds, Some(600));
        }
        other => panic!("{other:?}"),
    }
    // A plan without sharing: no address is read.
    assert!(!gate_with(&with_collector()).policy().reads_client_address);
}

#[test]
fn user_seat_and_sharing_settings_are_checked() {
    let mut errors: Vec<(Value, &str)> = Vec::new();
    let base = || {
        let mut c = with_collector();
        c["pseudonyms"] = json!({"key_id": "k2026", "secret": PSEUDONYM_SECRET});
        c["users"] = json!({"header": "x-end-user"});
        c
    };
    let mut c = base();
    c["users"] = json!({});
    errors.push((c, "users"));
    let mut c = base();
    c["users"] = json!({"claim": "uid", "header": "x-user"});
    errors.push((c, "users"));
    let mut c = base();
    c["users"] = json!({"header": "authorization"});
    errors.push((c, "users.header"));
    let mut c = base();
    c.as_object_mut().unwrap().remove("pseudonyms");
    errors.push((c, "users"));
    let mut c = base();
    c["pseudonyms"]["secret"] = json!("too short");
    errors.push((c, "pseudonyms.secret"));
    let mut c = base();
    c["plans"]["pro"]["seats"] = json!({"named": 2, "floating": 2});
    errors.push((c, "plans.pro.seats"));
    let mut c = base();
    c["plans"]["pro"]["seats"] = json!({"named": 0});
    errors.push((c, "plans.pro.seats.named"));
    let mut c = base();
    c["plans"]["pro"]["seats"] = json!({"named": 2, "window_seconds": 60});
    errors.push((c, "plans.pro.seats.window_seconds"));
    let mut c = base();
    c["plans"]["pro"]["seats"] = json!({"floating": 2, "window_seconds": 0});
    errors.push((c, "plans.pro.seats.window_seconds"));
    let mut c = base();
    c.as_object_mut().unwrap().remove("users");
    c["plans"]["pro"]["seats"] = json!({"named": 2});
    errors.push((c, "plans.pro.seats"));
    let mut c = base();
    c["plans"]["pro"]["sharing"] = json!({"max_clients": 0});
    errors.push((c, "plans.pro.sharing.max_clients"));
    let mut c = config();
    c["plans"]["pro"]["seats"] = json!({"named": 2});
    c["pseudonyms"] = json!({"key_id": "k2026", "secret": PSEUDONYM_SECRET});
    c["users"] = json!({"header": "x-end-user"});
    errors.push((c, "plans.pro"));
    for (config, field) in errors {
        let e = Policy::from_json(config.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("at `{field}`")), "{field}: {e}");
    }
    // A license may change its seats, not loosen its plan's sharing rule.
    let k = keys();
    let mut gate = gate_with(&base());
    let mut s = spec("pro", &["search"]);
    s.limits = Some(json!({"sharing": {"max_clients": 1000}}));
    let a = admit_user(&mut gate, &token(&k.ed, &s), Some("u"), None, NOW * 1000);
    assert_eq!(code(a.verdict), Some(Code::InvalidLicense));
    s.limits = Some(json!({"seats": {"named": 9}}));
    let a = admit_user(&mut gate, &token(&k.ed, &s), Some("u"), None, NOW * 1000);
    assert_eq!(a.verdict, Verdict::AwaitCollector);
    assert_eq!(
        gate.sync_work(NOW * 1000).seats[0].rule,
        tollgate_wire::sync::SeatRule::Named {
            limit: 9,
            per: tollgate_wire::sync::Period::Month
        }
    );
}
