//! Fixtures the fuzz targets and the seed generator share: fixed signing keys (checked in
//! under `fuzz/keys/`, so committed seed tokens stay valid), the filter configurations the
//! targets compile, and the ingest key the collector target signs with.
//!
//! Everything here is test scaffolding: it may panic on a broken fixture.

use std::sync::OnceLock;

use serde_json::{json, Value};
pub use tollgate_collector::signing::{KeyAlg, SigningKey};

/// The clock of every target (Unix seconds): fixed, so a finding reproduces on another day.
pub const NOW: u64 = 1_780_000_000;

/// The collector target's ingest key (`IngestKeys::parse` wants at least 16 bytes).
pub const INGEST_KEY_ID: &str = "fuzz";
pub const INGEST_SECRET: &str = "fuzz-ingest-secret-0123456789";

/// One key per algorithm Tollgate verifies.
pub struct Keys {
    pub ed: SigningKey,
    pub es: SigningKey,
    pub rs: SigningKey,
}

impl Keys {
    pub fn all(&self) -> [&SigningKey; 3] {
        [&self.ed, &self.es, &self.rs]
    }
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let import = |alg, kid, pem| SigningKey::import(alg, kid, pem).expect("fuzz key");
        Keys {
            ed: import(
                KeyAlg::EdDSA,
                "fuzz-ed",
                include_str!("../../keys/ed25519.pem"),
            ),
            es: import(
                KeyAlg::ES256,
                "fuzz-es",
                include_str!("../../keys/es256.pem"),
            ),
            rs: import(
                KeyAlg::RS256,
                "fuzz-rs",
                include_str!("../../keys/rs256.pem"),
            ),
        }
    })
}

/// The public JWKS of the three keys.
pub fn jwks() -> Value {
    tollgate_collector::signing::jwks(keys().all())
}

pub const ISSUER: &str = "https://licenses.fuzz.example";
pub const AUDIENCE: &str = "api.fuzz.example";

/// A filter configuration that turns on every check a token's claims meet: issuers and
/// audiences, a user claim (pseudonymised), plans with rate limits, per-feature limits,
/// quotas, seats and sharing (which need the collector).
pub fn filter_config() -> Value {
    json!({
        "token": {
            "issuers": [ISSUER],
            "audiences": [AUDIENCE],
            "leeway_seconds": 30,
            "jwks": jwks(),
        },
        "plans": {
            "starter": {"rate_limit": {"requests_per_second": 5, "burst": 10}},
            "pro": {
                "rate_limit": {"requests_per_second": 100},
                "feature_rate_limits": {"design": {"requests_per_second": 1, "burst": 2}},
                "quotas": {"calls": {"per": "day", "limit": 1000}},
                "seats": {"named": 3, "per": "month"},
            },
            "team": {
                "seats": {"floating": 2, "window_seconds": 900},
                "sharing": {"max_clients": 2, "window_seconds": 600, "block": true},
            },
        },
        "routes": [
            {"path": "/healthz", "public": true},
            {"prefix": "/v1/search", "feature": "search"},
            {"prefix": "/v1/design", "methods": ["POST"], "feature": "design"},
            {"prefix": "/v1/reports/", "methods": ["GET", "HEAD"], "feature": "reports"},
        ],
        "unmatched_routes": "deny",
        "collector": {
            "instance": "fuzz-node/tollgate",
            "key_id": INGEST_KEY_ID,
            "secret": INGEST_SECRET,
        },
        "quota": {"lease_fraction": 0.1, "without_collector": "allow", "allowance": 10},
        "pseudonyms": {"key_id": "k2026", "secret": "fuzz-pseudonym-secret-0123456789abcdef"},
        "users": {"claim": "uid"},
    })
}

/// The same filter with its keys fetched from a JWKS endpoint only.
pub fn remote_keys_config() -> Value {
    let mut config = filter_config();
    config["token"] = json!({
        "issuers": [ISSUER],
        "audiences": [AUDIENCE],
        "jwks_source": {"cluster": "licenses", "path": "/.well-known/jwks.json"},
    });
    config
}

/// Claims of a license that the filter configuration accepts at [`NOW`].
pub fn claims(plan: &str, features: &[&str]) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "acct-fuzz",
        "lid": "lic-fuzz-1",
        "plan": plan,
        "features": features,
        "uid": "user-7",
        "iat": NOW - 60,
        "nbf": NOW - 60,
        "exp": NOW + 3600,
    })
}

/// The JOSE header `key` signs with.
pub fn header(key: &SigningKey) -> String {
    json!({"alg": key.file.alg.name(), "kid": key.file.kid, "typ": "JWT"}).to_string()
}

/// `header_json` and `claims_json` signed as they are with the Ed25519 key: the bytes are
/// base64url-encoded, so any fuzz input makes a well-formed token whose signature verifies,
/// and reaches the header and claims parsers behind the signature check. Signed here with
/// ed25519-dalek on raw bytes: [`SigningKey::sign_raw`] takes text, and a fuzz input is not
/// UTF-8 in general.
pub fn sign_ed25519(header_json: &[u8], claims_json: &[u8]) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use ed25519_dalek::Signer as _;

    static KEY: OnceLock<ed25519_dalek::SigningKey> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        use ed25519_dalek::pkcs8::DecodePrivateKey as _;
        ed25519_dalek::SigningKey::from_pkcs8_pem(include_str!("../../keys/ed25519.pem"))
            .expect("fuzz Ed25519 key")
    });
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header_json),
        URL_SAFE_NO_PAD.encode(claims_json)
    );
    let signature = key.sign(message.as_bytes());
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

/// The input layout of each target: a first byte that selects what the rest is. Kept here so
/// the seeds and the targets agree.
pub mod layout {
    /// `token`: the rest is a token string.
    pub const TOKEN_RAW: u8 = 0;
    /// `token`: the rest is claims JSON, signed with the Ed25519 key under a fixed header.
    pub const TOKEN_SIGNED_CLAIMS: u8 = 1;
    /// `token`: the rest is header JSON, a 0 byte, claims JSON; signed with the Ed25519 key.
    pub const TOKEN_SIGNED_HEADER_AND_CLAIMS: u8 = 2;
    /// `token`: the rest is a JWKS document, answered by the keys' endpoint.
    pub const TOKEN_JWKS: u8 = 3;
    pub const TOKEN_MODES: u8 = 4;

    /// `wire`: which decoder takes the rest.
    pub const WIRE_BATCH: u8 = 0;
    pub const WIRE_SYNC_REQUEST: u8 = 1;
    pub const WIRE_SYNC_RESPONSE: u8 = 2;
    pub const WIRE_ACK: u8 = 3;
    pub const WIRE_REFUSAL: u8 = 4;
    /// `wire`: a sync response, then taken by a gate that waits for it ([`super::sync_flow`]).
    pub const WIRE_SYNC_RESPONSE_APPLIED: u8 = 5;
    pub const WIRE_MODES: u8 = 6;

    /// `collector_ingest`: bit 0 set: not signed correctly (bits 2-3 say how); bit 1 set:
    /// `POST /v1/sync` instead of `POST /v1/usage`. The rest is the body.
    pub const INGEST_FORGED: u8 = 1;
    pub const INGEST_SYNC: u8 = 2;
}

/// The seed corpus: small valid (and nearly valid) inputs per target, so the fuzzer starts
/// past the parsers' first bytes.
pub mod seeds {
    use std::path::Path;

    use serde_json::{json, Value};

    use super::{claims, filter_config, header, keys, layout, remote_keys_config, NOW};

    /// A golden file of the wire crate without its `#` comment lines.
    fn golden(name: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../wire/golden")
            .join(name);
        let text = std::fs::read_to_string(&path).expect("golden file");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes()
    }

    /// `pretty` re-encoded without whitespace.
    fn compact(pretty: &[u8]) -> Vec<u8> {
        let value: Value = serde_json::from_slice(pretty).expect("JSON");
        serde_json::to_vec(&value).expect("JSON")
    }

    fn with_mode(mode: u8, rest: &[u8]) -> Vec<u8> {
        let mut out = vec![mode];
        out.extend_from_slice(rest);
        out
    }

    /// Every target's seeds: (target, file name, bytes).
    pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
            out.push((target, name.to_string(), bytes));
        };
        let k = keys();

        // token: valid tokens of each algorithm and plan, and near misses.
        let pro = claims("pro", &["search", "design", "reports"]);
        let mut team = claims("team", &["search"]);
        team["aud"] = json!(["other.example", super::AUDIENCE]);
        team["uid"] = json!(12345);
        let mut overrides = claims("pro", &["search", "design"]);
        overrides["limits"] = json!({
            "rate_limit": {"requests_per_second": 2.5, "burst": 3},
            "feature_rate_limits": {"design": {"requests_per_second": 0.5}},
            "quotas": {"calls": {"per": "month", "limit": 50}, "response_bytes": {"per": "hour", "limit": 1048576}},
            "seats": {"floating": 4, "window_seconds": 60},
        });
        let mut expired = claims("starter", &["search"]);
        expired["exp"] = json!(NOW - 3600);
        let starter = claims("starter", &["search"]);
        for (name, key) in [("ed", &k.ed), ("es", &k.es), ("rs", &k.rs)] {
            let token = key.sign(&starter).expect("sign");
            add(
                "token",
                &format!("raw-{name}-starter"),
                with_mode(layout::TOKEN_RAW, token.as_bytes()),
            );
        }
        for (name, c) in [
            ("pro", &pro),
            ("team", &team),
            ("overrides", &overrides),
            ("expired", &expired),
        ] {
            let token = k.ed.sign(c).expect("sign");
            add(
                "token",
                &format!("raw-ed-{name}"),
                with_mode(layout::TOKEN_RAW, token.as_bytes()),
            );
            let body = serde_json::to_vec(c).expect("JSON");
            add(
                "token",
                &format!("claims-{name}"),
                with_mode(layout::TOKEN_SIGNED_CLAIMS, &body),
            );
        }
        let mut tampered = k.es.sign(&pro).expect("sign");
        tampered.replace_range(tampered.len() - 4.., "AAAA");
        add(
            "token",
            "raw-es-tampered",
            with_mode(layout::TOKEN_RAW, tampered.as_bytes()),
        );
        let mut both = header(&k.ed).into_bytes();
        both.push(0);
        both.extend(serde_json::to_vec(&overrides).expect("JSON"));
        add(
            "token",
            "header-and-claims",
            with_mode(layout::TOKEN_SIGNED_HEADER_AND_CLAIMS, &both),
        );
        // Critical header extensions (RFC 7515 section 4.1.11): one not understood, and
        // malformed lists; all must be refused behind a good signature.
        for (name, crit) in [
            ("crit-unknown", json!({"crit": ["x-ext"], "x-ext": true})),
            ("crit-empty", json!({"crit": []})),
            ("crit-registered", json!({"crit": ["kid"]})),
            ("crit-null", json!({"crit": null})),
        ] {
            let mut header: Value = serde_json::from_str(&header(&k.ed)).expect("JSON");
            for (member, value) in crit.as_object().expect("object") {
                header[member] = value.clone();
            }
            let mut both = header.to_string().into_bytes();
            both.push(0);
            both.extend(serde_json::to_vec(&starter).expect("JSON"));
            add(
                "token",
                &format!("header-{name}"),
                with_mode(layout::TOKEN_SIGNED_HEADER_AND_CLAIMS, &both),
            );
        }
        let jwks = super::jwks();
        add(
            "token",
            "jwks-all",
            with_mode(layout::TOKEN_JWKS, jwks.to_string().as_bytes()),
        );
        let mixed = json!({"keys": [
            k.ed.file.public_jwk,
            {"kty": "oct", "kid": "hmac-1", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "enc-1", "use": "enc", "n": "AQAB", "e": "AQAB"},
        ]});
        add(
            "token",
            "jwks-mixed",
            with_mode(layout::TOKEN_JWKS, mixed.to_string().as_bytes()),
        );

        // config: the fixtures and the demo's configuration.
        add(
            "config",
            "full",
            serde_json::to_vec_pretty(&filter_config()).expect("JSON"),
        );
        add(
            "config",
            "remote-keys",
            serde_json::to_vec(&remote_keys_config()).expect("JSON"),
        );
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../envoy/tollgate.json");
        add(
            "config",
            "demo",
            std::fs::read(demo).expect("envoy/tollgate.json"),
        );
        let minimal = json!({
            "token": {"jwks": {"keys": [k.es.file.public_jwk]}},
            "plans": {"basic": {}},
            "routes": [{"prefix": "/", "feature": "api"}],
            "unmatched_routes": "allow",
            "upstream_headers": {"account": null, "plan": "x-plan"},
        });
        add(
            "config",
            "minimal",
            serde_json::to_vec(&minimal).expect("JSON"),
        );
        let mut header_users = filter_config();
        header_users["users"] = json!({"header": "X-User"});
        header_users["quota"] = json!({"reserve": {"response_bytes": 1024, "processing_ns": 5}, "exhausted_status": 402, "lease_wait_ms": 100});
        header_users["collector"]["on_buffer_full"] = json!("fail_open");
        header_users["collector"]["max_batch_records"] = json!(10);
        add(
            "config",
            "header-users",
            serde_json::to_vec(&header_users).expect("JSON"),
        );

        // wire: every golden file, as written (pretty) and compact.
        for (mode, file) in [
            (layout::WIRE_BATCH, "batch_v1"),
            (layout::WIRE_SYNC_REQUEST, "sync_request_v1"),
            (layout::WIRE_SYNC_RESPONSE, "sync_response_v1"),
            (layout::WIRE_ACK, "ack_v1"),
            (layout::WIRE_REFUSAL, "refusal_v1"),
        ] {
            let pretty = golden(&format!("{file}.json.golden"));
            add(
                "wire",
                &format!("{file}-compact"),
                with_mode(mode, &compact(&pretty)),
            );
            add("wire", &format!("{file}-pretty"), with_mode(mode, &pretty));
        }

        // wire: answers to the sync of `sync_flow`, granting or refusing what it asks.
        let (_, _, work) = super::sync_flow::prepare();
        let grants = |granted: u64| -> Vec<Value> {
            // The first sync asks for seats only (a quota is leased once the seat is held):
            // the later syncs of `sync_flow::answer` ask for these.
            let later = ["fuzz-node/1/q1", "fuzz-node/1/q2"].map(String::from);
            work.leases
                .iter()
                .map(|l| l.lease_id.clone())
                .chain(later)
                .map(|id| {
                    json!({"lease_id": id, "granted": granted,
                        "period_start_ms": 1_779_926_400_000u64, "period_end_ms": 1_780_012_800_000u64,
                        "expires_ms": super::sync_flow::SYNC_MS + 60_000, "allocated": granted})
                })
                .collect()
        };
        let seats = |granted: bool| -> Vec<Value> {
            work.seats
                .iter()
                .map(|s| {
                    json!({"license": s.license, "user": s.user, "granted": granted,
                        "until_ms": super::sync_flow::SYNC_MS + 900_000, "in_use": 1, "limit": s.rule.limit()})
                })
                .collect()
        };
        let granting = json!({"version": 1, "grants": grants(100), "closed": [], "denials": [], "seats": seats(true)});
        let refusing = json!({"version": 1, "grants": grants(0), "closed": ["fuzz-node/1/q1"], "seats": seats(false),
            "denials": [{"account": "acct-fuzz", "license": "lic-fuzz-team", "code": "spend_cap_reached",
                "message": "over budget", "until_ms": super::sync_flow::SYNC_MS + 86_400_000}]});
        for (name, response) in [("granting", granting), ("refusing", refusing)] {
            let body = serde_json::to_vec(&response).expect("JSON");
            add(
                "wire",
                &format!("sync-applied-{name}"),
                with_mode(layout::WIRE_SYNC_RESPONSE_APPLIED, &body),
            );
        }

        // collector_ingest: the golden batch and sync request, signed and not.
        let batch = compact(&golden("batch_v1.json.golden"));
        let sync = compact(&golden("sync_request_v1.json.golden"));
        add("collector_ingest", "batch-signed", with_mode(0, &batch));
        add(
            "collector_ingest",
            "batch-forged",
            with_mode(layout::INGEST_FORGED, &batch),
        );
        add(
            "collector_ingest",
            "sync-signed",
            with_mode(layout::INGEST_SYNC, &sync),
        );
        let mut empty: Value = serde_json::from_slice(&batch).expect("JSON");
        empty["batch_id"] = json!("fuzz-node/1780000000000/1");
        empty["records"] = json!([]);
        add(
            "collector_ingest",
            "batch-empty-signed",
            with_mode(0, &serde_json::to_vec(&empty).expect("JSON")),
        );
        out
    }
}

/// The filter's side of a sync: a gate holds requests for quota leases and seats, syncs, and
/// takes the collector's answer (`Gate::apply_sync`), as `filter/src/lib.rs` does with a
/// decoded [`SyncResponse`](tollgate_wire::sync::SyncResponse).
pub mod sync_flow {
    use std::rc::Rc;
    use std::sync::{Arc, OnceLock};

    use tollgate_core::gate::SyncWork;
    use tollgate_core::{Admission, Gate, MemoryCells, Policy, RequestHead, UsageTotals};
    use tollgate_wire::sync::SyncResponse;

    use super::{claims, filter_config, keys, NOW};

    pub type FuzzGate = Gate<Rc<MemoryCells>>;

    /// When the first sync is sent (Unix milliseconds).
    pub const SYNC_MS: u64 = NOW * 1000;

    fn policy() -> &'static Arc<Policy> {
        static POLICY: OnceLock<Arc<Policy>> = OnceLock::new();
        POLICY.get_or_init(|| {
            let config = filter_config().to_string();
            Arc::new(Policy::from_json(config.as_bytes()).expect("fuzz filter config"))
        })
    }

    /// Credentials of a `pro` license (a quota and named seats) and a `team` one (floating
    /// seats and sharing detection).
    fn credentials() -> &'static [String; 2] {
        static CREDENTIALS: OnceLock<[String; 2]> = OnceLock::new();
        CREDENTIALS.get_or_init(|| {
            let mut team = claims("team", &["search"]);
            team["lid"] = serde_json::json!("lic-fuzz-team");
            [claims("pro", &["search", "design"]), team]
                .map(|c| format!("Bearer {}", keys().ed.sign(&c).expect("signing")))
        })
    }

    fn ask(gate: &mut FuzzGate, credential: &str, client: &str, at_ms: u64) -> Admission {
        gate.admit(
            &RequestHead {
                method: "GET",
                path: "/v1/search",
                credential: Some(credential),
                user: None,
                client_address: Some(client),
            },
            at_ms * 1_000_000,
        )
    }

    /// A gate with requests held for the collector, and the sync it sends for them.
    pub fn prepare() -> (FuzzGate, Vec<Admission>, SyncWork) {
        let mut gate = Gate::new(Arc::clone(policy()), Rc::new(MemoryCells::default()));
        gate.set_lease_prefix("fuzz-node/1");
        let held = credentials()
            .iter()
            .zip(["192.0.2.1", "192.0.2.2"])
            .map(|(credential, client)| ask(&mut gate, credential, client, SYNC_MS - 10))
            .collect();
        let work = gate.sync_work(SYNC_MS);
        (gate, held, work)
    }

    /// The collector answered `work` with `response`: decide the held requests, serve more,
    /// and sync again later (returns, renewals), answered with the same response.
    pub fn answer(
        mut gate: FuzzGate,
        mut held: Vec<Admission>,
        work: &SyncWork,
        response: &SyncResponse,
    ) {
        gate.apply_sync(work, response, SYNC_MS + 5);
        let usage = UsageTotals {
            calls: 1,
            request_bytes: 10,
            response_bytes: 70_000,
            processing_nanos: 2_000_000_000,
        };
        for (i, admission) in held.iter_mut().enumerate() {
            gate.retry_held(admission, SYNC_MS + 10, false);
            // One is served, the other is not after all (its client went away).
            if i == 0 {
                gate.record(admission, usage);
            } else {
                gate.release(admission);
            }
        }
        for (i, at_ms) in [SYNC_MS + 20, SYNC_MS + 3_600_000, SYNC_MS + 40 * 86_400_000]
            .into_iter()
            .enumerate()
        {
            for (credential, client) in credentials().iter().zip(["192.0.2.3", "192.0.2.4"]) {
                let mut admission = ask(&mut gate, credential, client, at_ms);
                gate.retry_held(&mut admission, at_ms + 1, i > 0);
                gate.record(&admission, usage);
            }
            let next = gate.sync_work(at_ms + 2);
            if i == 1 {
                gate.sync_failed(next, at_ms + 3);
            } else {
                gate.apply_sync(&next, response, at_ms + 3);
            }
        }
        let _ = gate.drain_usage();
    }
}

/// The fixtures do what the targets rely on: a seed that stops being valid (a key, claim or
/// configuration that drifted) would leave the fuzzer stuck at the first check.
#[cfg(test)]
mod tests {
    use tollgate_core::{token, Policy, Verdict};
    use tollgate_wire::sync::SyncResponse;

    use super::*;

    #[test]
    fn signed_claims_seeds_make_valid_licenses() {
        let policy = Policy::from_json(filter_config().to_string().as_bytes()).unwrap();
        let header = header(&keys().ed);
        for plan in ["starter", "pro", "team"] {
            let body = serde_json::to_vec(&claims(plan, &["search"])).unwrap();
            let token = sign_ed25519(header.as_bytes(), &body);
            let license = token::verify(&policy, None, &token, NOW).unwrap();
            assert_eq!(&*license.plan.name, plan);
        }
        for key in keys().all() {
            let token = key.sign(&claims("pro", &["search"])).unwrap();
            token::verify(&policy, None, &token, NOW).unwrap();
        }
    }

    #[test]
    fn the_granting_sync_seed_lets_the_held_requests_through() {
        let seed = seeds::all()
            .into_iter()
            .find(|(target, name, _)| *target == "wire" && name == "sync-applied-granting")
            .unwrap()
            .2;
        assert_eq!(seed[0], layout::WIRE_SYNC_RESPONSE_APPLIED);
        let response = SyncResponse::decode(&seed[1..]).unwrap();
        let (mut gate, mut held, work) = sync_flow::prepare();
        assert!(held.iter().all(|a| a.verdict == Verdict::AwaitCollector));
        assert_eq!(work.seats.len(), 2, "{work:?}");
        gate.apply_sync(&work, &response, sync_flow::SYNC_MS + 5);
        // The seats are granted; the pro license's quota then asks for a lease.
        for admission in &mut held {
            gate.retry_held(admission, sync_flow::SYNC_MS + 10, false);
        }
        assert_eq!(held[1].verdict, Verdict::Allow, "team: seat, no quota");
        assert_eq!(held[0].verdict, Verdict::AwaitCollector, "pro: lease next");
        let next = gate.sync_work(sync_flow::SYNC_MS + 20);
        assert_eq!(next.leases.len(), 1);
        assert_eq!(next.leases[0].lease_id, "fuzz-node/1/q1");
        gate.apply_sync(&next, &response, sync_flow::SYNC_MS + 25);
        gate.retry_held(&mut held[0], sync_flow::SYNC_MS + 30, false);
        assert_eq!(held[0].verdict, Verdict::Allow);
    }

    #[test]
    fn collector_seeds_are_valid_batches_and_syncs() {
        for (target, name, bytes) in seeds::all() {
            if target != "collector_ingest" || name.contains("forged") {
                continue;
            }
            let body = &bytes[1..];
            if bytes[0] & layout::INGEST_SYNC != 0 {
                tollgate_wire::sync::SyncRequest::decode(body).unwrap();
            } else {
                tollgate_wire::UsageBatch::decode(body).unwrap();
            }
        }
    }
}
