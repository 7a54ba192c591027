//! The license server, in SQLite: [`LicensingStore`] for [`SqliteStore`].

use super::*;

impl LicensingStore for SqliteStore {
    fn add_signing_key(&self, key: &StoredKey) -> Result<bool> {
        let conn = self.conn()?;
        let added = conn.execute(
            "INSERT INTO signing_keys (kid, alg, private_pem, public_jwk, created_ms, activates_ms, retired_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL) ON CONFLICT (kid) DO NOTHING",
            params![key.kid, key.alg, key.private_pem, key.public_jwk, to_i64("created_ms", key.created_ms)?, to_i64("activates_ms", key.activates_ms)?],
        )?;
        Ok(added == 1)
    }

    fn signing_keys(&self) -> Result<Vec<StoredKey>> {
        self.read(|conn| {
        let mut statement = conn.prepare_cached(
            "SELECT kid, alg, private_pem, public_jwk, created_ms, activates_ms, retired_ms FROM signing_keys ORDER BY created_ms, kid",
        )?;
        let rows = statement.query_map([], |r| {
            Ok(StoredKey {
                kid: r.get(0)?,
                alg: r.get(1)?,
                private_pem: r.get(2)?,
                public_jwk: r.get(3)?,
                created_ms: u64_of(r.get(4)?),
                activates_ms: u64_of(r.get(5)?),
                retired_ms: r.get::<_, Option<i64>>(6)?.map(u64_of),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn retire_signing_key(&self, kid: &str, now_ms: u64) -> Result<bool> {
        let conn = self.conn()?;
        let found = conn.execute(
            "UPDATE signing_keys SET retired_ms = COALESCE(retired_ms, ?1) WHERE kid = ?2",
            params![to_i64("now_ms", now_ms)?, kid],
        )?;
        Ok(found == 1)
    }

    fn add_license(&self, l: &IssuedLicense) -> Result<bool> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let added = tx.execute(
            "INSERT INTO issued_licenses (license, account, plan, features, limits, not_before_ms, expires_ms, kid, issued_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (license) DO NOTHING",
            params![
                l.license,
                l.account,
                l.plan,
                serde_json::to_string(&l.features)?,
                l.limits.as_ref().map(serde_json::to_string).transpose()?,
                to_i64("not_before_ms", l.not_before_ms)?,
                to_i64("expires_ms", l.expires_ms)?,
                l.kid,
                to_i64("issued_ms", l.issued_ms)?,
            ],
        )?;
        if added == 1 {
            // The plan is known before any filter serves the license: its usage is priced.
            tx.execute(
                "INSERT INTO licenses (license, account, plan, last_seen_ms) VALUES (?1, ?2, ?3, 0)
                 ON CONFLICT (license) DO UPDATE SET account = excluded.account, plan = excluded.plan",
                params![l.license, l.account, l.plan],
            )?;
        }
        tx.commit()?;
        Ok(added == 1)
    }

    fn issued_licenses(&self, account: Option<&str>) -> Result<Vec<IssuedLicense>> {
        self.read(|conn| {
        let mut statement = conn.prepare_cached(
            "SELECT i.license, i.account, i.plan, i.features, i.limits, i.not_before_ms, i.expires_ms, i.kid, i.issued_ms, r.revoked_ms
             FROM issued_licenses i LEFT JOIN revoked_licenses r ON r.license = i.license
             WHERE (?1 IS NULL OR i.account = ?1) ORDER BY i.license",
        )?;
        let rows = statement.query_map(params![account], |r| {
            Ok(license_of((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
            )))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
}
