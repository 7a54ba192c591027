//! The license server, in PostgreSQL: [`LicensingStore`] for [`PostgresStore`].

use super::*;

impl LicensingStore for PostgresStore {
    fn add_signing_key(&self, key: &StoredKey) -> Result<bool> {
        let (created, activates) = (
            to_i64("created_ms", key.created_ms)?,
            to_i64("activates_ms", key.activates_ms)?,
        );
        self.with_client(|client| {
            let added = client.execute(
                "INSERT INTO signing_keys (kid, alg, private_pem, public_jwk, created_ms, activates_ms, retired_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, NULL) ON CONFLICT (kid) DO NOTHING",
                &[&key.kid, &key.alg, &key.private_pem, &key.public_jwk, &created, &activates],
            )?;
            Ok(added == 1)
        })
    }

    fn signing_keys(&self) -> Result<Vec<StoredKey>> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT kid, alg, private_pem, public_jwk, created_ms, activates_ms, retired_ms FROM signing_keys ORDER BY created_ms, kid",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|r| StoredKey {
                    kid: r.get(0),
                    alg: r.get(1),
                    private_pem: r.get(2),
                    public_jwk: r.get(3),
                    created_ms: u64_of(r.get(4)),
                    activates_ms: u64_of(r.get(5)),
                    retired_ms: r.get::<_, Option<i64>>(6).map(u64_of),
                })
                .collect())
        })
    }

    fn retire_signing_key(&self, kid: &str, now_ms: u64) -> Result<bool> {
        let now = to_i64("now_ms", now_ms)?;
        self.with_client(|client| {
            let found = client.execute(
                "UPDATE signing_keys SET retired_ms = COALESCE(retired_ms, $1) WHERE kid = $2",
                &[&now, &kid],
            )?;
            Ok(found == 1)
        })
    }

    fn add_license(&self, l: &IssuedLicense) -> Result<bool> {
        let features = serde_json::to_string(&l.features)?;
        let limits = l.limits.as_ref().map(serde_json::to_string).transpose()?;
        let (nbf, exp, issued) = (
            to_i64("not_before_ms", l.not_before_ms)?,
            to_i64("expires_ms", l.expires_ms)?,
            to_i64("issued_ms", l.issued_ms)?,
        );
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            let added = tx.execute(
                "INSERT INTO issued_licenses (license, account, plan, features, limits, not_before_ms, expires_ms, kid, issued_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (license) DO NOTHING",
                &[&l.license, &l.account, &l.plan, &features, &limits, &nbf, &exp, &l.kid, &issued],
            )?;
            if added == 1 {
                // The plan is known before any filter serves the license: its usage is priced.
                tx.execute(
                    "INSERT INTO licenses (license, account, plan, last_seen_ms) VALUES ($1, $2, $3, 0)
                     ON CONFLICT (license) DO UPDATE SET account = excluded.account, plan = excluded.plan",
                    &[&l.license, &l.account, &l.plan],
                )?;
            }
            tx.commit()?;
            Ok(added == 1)
        })
    }

    fn issued_licenses(&self, account: Option<&str>) -> Result<Vec<IssuedLicense>> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT i.license, i.account, i.plan, i.features, i.limits, i.not_before_ms, i.expires_ms, i.kid, i.issued_ms, r.revoked_ms
                 FROM issued_licenses i LEFT JOIN revoked_licenses r ON r.license = i.license
                 WHERE ($1::TEXT IS NULL OR i.account = $1) ORDER BY i.license",
                &[&account],
            )?;
            Ok(rows
                .iter()
                .map(|r| {
                    license_of((
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        r.get(3),
                        r.get(4),
                        r.get(5),
                        r.get(6),
                        r.get(7),
                        r.get(8),
                        r.get(9),
                    ))
                })
                .collect())
        })
    }
}
