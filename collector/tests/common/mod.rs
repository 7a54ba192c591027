//! Helpers shared by the collector's integration tests: every storage backend, fresh.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;

use tollgate_devkit::postgres::TestPostgres;

/// A storage backend for one test, cleaned up when dropped.
pub enum Backend {
    Sqlite(PathBuf),
    Postgres(TestPostgres),
    /// A database someone else owns.
    Url(String),
}

impl Backend {
    pub fn url(&self) -> String {
        match self {
            Backend::Sqlite(path) => format!("sqlite://{}", path.display()),
            Backend::Postgres(pg) => pg.url(),
            Backend::Url(url) => url.clone(),
        }
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
            Backend::Url(_) => "url",
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Backend::Sqlite(path) = self {
            if let Some(dir) = path.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// One test body, a test per backend: `conformance! { fn name(db, "label") { ... } }` makes
/// `name::sqlite` and `name::postgres`, each with `db` a fresh [`Backend`] (the label names its
/// files; short, since PostgreSQL's socket path is bounded). A backend that drifts from the
/// other fails its own test, by name. The model is limitador's `test_with_all_storage_impls!`.
macro_rules! conformance {
    ($(#[$meta:meta])* fn $name:ident($db:ident, $label:literal) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn sqlite() {
                let $db = $crate::common::sqlite($label);
                $body
            }

            #[test]
            fn postgres() {
                let $db = $crate::common::Backend::Postgres(
                    tollgate_devkit::postgres::TestPostgres::start($label).unwrap(),
                );
                $body
            }
        }
    };
}
pub(crate) use conformance;

/// Every backend, fresh: the same test body runs against each.
pub fn backends(name: &str) -> Vec<Backend> {
    vec![
        sqlite(name),
        Backend::Postgres(TestPostgres::start(name).unwrap()),
    ]
}

/// A fresh SQLite file only, for tests of what lies above the store (HTTP, the CLI): bind it
/// for the whole test, since its folder goes when it is dropped.
#[must_use = "the database's folder is removed when the backend is dropped"]
pub fn sqlite(name: &str) -> Backend {
    let dir =
        std::env::temp_dir().join(format!("tollgate-collector-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Backend::Sqlite(dir.join("usage.db"))
}
