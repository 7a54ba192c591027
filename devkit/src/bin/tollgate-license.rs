//! Make license signing keys and mint license tokens.
//!
//! ```text
//! tollgate-license keygen --alg EdDSA|ES256|RS256 --kid KID --out KEY.json
//! tollgate-license jwks KEY.json...
//! tollgate-license mint --key KEY.json --sub ACCOUNT --lid LICENSE --plan PLAN
//!                       [--feature NAME]... [--ttl SECONDS] [--iss ISSUER] [--aud AUDIENCE]
//!                       [--limits JSON]
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tollgate_devkit::{jwks, KeyAlg, LicenseSpec, SigningKey};

const USAGE: &str = "usage:
  tollgate-license keygen --alg EdDSA|ES256|RS256 --kid KID --out KEY.json
  tollgate-license jwks KEY.json...
  tollgate-license mint --key KEY.json --sub ACCOUNT --lid LICENSE --plan PLAN
                        [--feature NAME]... [--ttl SECONDS] [--iss ISSUER] [--aud AUDIENCE]
                        [--limits JSON]";

/// `--name value` pairs and bare arguments.
struct Args {
    pairs: Vec<(String, String)>,
    bare: Vec<String>,
}

impl Args {
    fn parse(raw: impl Iterator<Item = String>) -> Result<Args> {
        let mut pairs = Vec::new();
        let mut bare = Vec::new();
        let mut raw = raw.peekable();
        while let Some(arg) = raw.next() {
            if let Some(name) = arg.strip_prefix("--") {
                let Some(value) = raw.next() else {
                    bail!("--{name} needs a value\n{USAGE}")
                };
                pairs.push((name.to_string(), value));
            } else {
                bare.push(arg);
            }
        }
        Ok(Args { pairs, bare })
    }

    fn one(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn required(&self, name: &str) -> Result<&str> {
        self.one(name)
            .with_context(|| format!("--{name} is required\n{USAGE}"))
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn reject_unknown(&self, known: &[&str]) -> Result<()> {
        for (name, _) in &self.pairs {
            if !known.contains(&name.as_str()) {
                bail!("unknown option --{name}\n{USAGE}");
            }
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let mut raw = std::env::args().skip(1);
    let command = raw.next().unwrap_or_default();
    let args = Args::parse(raw)?;
    match command.as_str() {
        "keygen" => {
            args.reject_unknown(&["alg", "kid", "out"])?;
            let alg: KeyAlg = args.one("alg").unwrap_or("EdDSA").parse()?;
            let key = SigningKey::generate(alg, args.required("kid")?)?;
            key.save(&PathBuf::from(args.required("out")?))?;
            println!("{}", serde_json::to_string_pretty(&key.file.public_jwk)?);
        }
        "jwks" => {
            let keys = args
                .bare
                .iter()
                .map(|p| SigningKey::load(&PathBuf::from(p)))
                .collect::<Result<Vec<_>>>()?;
            if keys.is_empty() {
                bail!("name at least one key file\n{USAGE}");
            }
            println!("{}", serde_json::to_string_pretty(&jwks(&keys))?);
        }
        "mint" => {
            args.reject_unknown(&[
                "key", "sub", "lid", "plan", "feature", "ttl", "iss", "aud", "limits",
            ])?;
            let key = SigningKey::load(&PathBuf::from(args.required("key")?))?;
            let mut spec = LicenseSpec::new(
                args.required("sub")?,
                args.required("lid")?,
                args.required("plan")?,
                &args.all("feature"),
            );
            if let Some(ttl) = args.one("ttl") {
                spec.ttl_seconds = ttl.parse().context("--ttl is a number of seconds")?;
            }
            spec.issuer = args.one("iss").map(String::from);
            spec.audience = args.one("aud").map(String::from);
            if let Some(limits) = args.one("limits") {
                spec.limits = Some(serde_json::from_str(limits).context("--limits is JSON")?);
            }
            println!("{}", spec.mint(&key)?);
        }
        "" | "-h" | "--help" | "help" => println!("{USAGE}"),
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
    Ok(())
}
