//! Webhooks to a payment system: events (invoice finalised, spend threshold crossed) are
//! enqueued in the store with a stable id, then delivered by the collector's worker, signed,
//! retried with backoff, and logged attempt by attempt.
//!
//! A delivery is a `POST` of `{"id", "type", "created", "data"}` with:
//! - `idempotency-key` and `tollgate-event-id`: the event id (a receiver that got it before
//!   must answer 2xx and do nothing);
//! - `tollgate-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, keyed with
//!   the webhook secret; receivers check it and refuse old timestamps (replays).
//!
//! Any answer but 2xx, and no answer, is retried: after 1 s, 2 s, 4 s, ... (at most
//! `retry_max_ms`), up to `max_attempts`; then the event is marked failed and logged.

use std::time::{Duration, Instant};

use anyhow::Result;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::storage::{Delivery, DeliveryOutcome, Store, WebhookEvent};

/// Where and how events are delivered.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub url: String,
    pub secret: Vec<u8>,
    pub max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub timeout_ms: u64,
}

impl WebhookSettings {
    pub fn new(url: &str, secret: &str) -> Result<WebhookSettings> {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            anyhow::bail!("the webhook URL must be http:// or https://, got `{url}`");
        }
        if secret.len() < 16 {
            anyhow::bail!("the webhook secret needs at least 16 bytes");
        }
        Ok(WebhookSettings {
            url: url.to_string(),
            secret: secret.as_bytes().to_vec(),
            max_attempts: 12,
            retry_base_ms: 1000,
            retry_max_ms: 3_600_000,
            timeout_ms: 10_000,
        })
    }

    /// The wait before attempt `attempt + 1`.
    fn backoff_ms(&self, attempt: u32) -> u64 {
        self.retry_base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
            .min(self.retry_max_ms)
    }
}

/// A new event, due now.
pub fn event(
    event_id: String,
    event_type: &str,
    data: serde_json::Value,
    now_ms: u64,
) -> WebhookEvent {
    WebhookEvent {
        event_id,
        event_type: event_type.to_string(),
        payload: data,
        created_ms: now_ms,
        next_attempt_ms: now_ms,
        attempts: 0,
        delivered_ms: None,
        failed_ms: None,
    }
}

fn hmac_hex(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `tollgate-signature` header of `body` sent at `timestamp` (Unix seconds).
pub fn signature_header(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    format!("t={timestamp},v1={}", hmac_hex(secret, timestamp, body))
}

/// What a receiver checks: the signature matches and `t` is within `tolerance_s` of `now_s`.
pub fn verify_signature(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_s: u64,
    tolerance_s: u64,
) -> bool {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<u64>().ok(),
            Some(("v1", v)) => signatures.push(v),
            _ => {}
        }
    }
    let Some(t) = timestamp else {
        return false;
    };
    if t.abs_diff(now_s) > tolerance_s {
        return false;
    }
    let expected = hmac_hex(secret, t, body);
    signatures.iter().any(|s| {
        s.len() == expected.len()
            && s.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

/// The body sent for `event`.
pub fn envelope(event: &WebhookEvent) -> String {
    let created =
        chrono::DateTime::from_timestamp_millis(i64::try_from(event.created_ms).unwrap_or(0))
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default();
    json!({
        "id": event.event_id,
        "type": event.event_type,
        "created": created,
        "data": event.payload,
    })
    .to_string()
}

/// Deliver the events due at `now_ms`, one after the other; how many were attempted.
pub fn deliver_due(
    store: &dyn Store,
    settings: &WebhookSettings,
    clock: &crate::clock::Clock,
    now_ms: u64,
) -> Result<usize> {
    // One event is claimed at a time, for longer than its delivery can take, so no other
    // replica sends it meanwhile.
    let lease = settings.timeout_ms.saturating_mul(2).saturating_add(5_000);
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(settings.timeout_ms))
        .redirects(0)
        .build();
    let mut attempted = 0;
    while attempted < MAX_PER_ROUND {
        let now = clock.now_ms().max(now_ms);
        let Some(event) = store.claim_events(now, lease, 1)?.pop() else {
            break;
        };
        attempted += 1;
        let event = &event;
        let attempt = event.attempts.saturating_add(1);
        let body = envelope(event);
        let sent_at = clock.now_ms();
        let started = Instant::now();
        let sent_s = sent_at / 1000;
        let result = agent
            .post(&settings.url)
            .set("content-type", "application/json")
            .set("idempotency-key", &event.event_id)
            .set("tollgate-event-id", &event.event_id)
            .set("tollgate-event-type", &event.event_type)
            .set(
                "tollgate-signature",
                &signature_header(&settings.secret, sent_s, body.as_bytes()),
            )
            .send_string(&body);
        let (status, error) = match result {
            Ok(response) => (Some(response.status()), None),
            Err(ureq::Error::Status(code, _)) => (Some(code), Some(format!("HTTP {code}"))),
            Err(e) => (None, Some(e.to_string())),
        };
        let delivered = status.is_some_and(|s| (200..300).contains(&s));
        let at = sent_at;
        let outcome = if delivered {
            DeliveryOutcome::Delivered
        } else if attempt >= settings.max_attempts {
            DeliveryOutcome::GaveUp
        } else {
            DeliveryOutcome::RetryAt(at.saturating_add(settings.backoff_ms(attempt)))
        };
        // `type` is a keyword: the field is `event_type` in the log line.
        let (event_id, event_type) = (&event.event_id, &event.event_type);
        let error_text = error.as_deref().unwrap_or("");
        match outcome {
            DeliveryOutcome::Delivered => {
                tracing::info!(%event_id, %event_type, attempt, status, "webhook delivered")
            }
            DeliveryOutcome::RetryAt(_) => tracing::warn!(
                %event_id, %event_type, attempt, status, error = %error_text,
                "webhook not delivered; will retry"
            ),
            DeliveryOutcome::GaveUp => tracing::error!(
                %event_id, %event_type, attempt, status, error = %error_text,
                "webhook not delivered; gave up"
            ),
        }
        store.record_delivery(
            &Delivery {
                event_id: event.event_id.clone(),
                attempt,
                at_ms: at,
                status,
                error,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            },
            outcome,
        )?;
    }
    Ok(attempted)
}

/// Events delivered per round at most: the worker's other work is not held up for long.
const MAX_PER_ROUND: usize = 20;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn signatures_verify_and_refuse_tampering_and_replays() {
        let secret = b"webhook-secret-0123456789";
        let header = signature_header(secret, 1_800_000_000, b"{\"id\":1}");
        assert!(verify_signature(
            secret,
            &header,
            b"{\"id\":1}",
            1_800_000_010,
            300
        ));
        assert!(!verify_signature(
            secret,
            &header,
            b"{\"id\":2}",
            1_800_000_010,
            300
        ));
        assert!(!verify_signature(
            b"another-secret-000000",
            &header,
            b"{\"id\":1}",
            1_800_000_010,
            300
        ));
        assert!(!verify_signature(
            secret,
            &header,
            b"{\"id\":1}",
            1_800_001_000,
            300
        ));
        assert!(!verify_signature(
            secret,
            "v1=abc",
            b"{\"id\":1}",
            1_800_000_000,
            300
        ));
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let mut s =
            WebhookSettings::new("http://127.0.0.1:1/hook", "webhook-secret-0123456789").unwrap();
        s.retry_max_ms = 10_000;
        let waits: Vec<u64> = (1..=6).map(|a| s.backoff_ms(a)).collect();
        assert_eq!(waits, vec![1000, 2000, 4000, 8000, 10_000, 10_000]);
    }
}
