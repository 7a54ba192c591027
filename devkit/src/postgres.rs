//! A throwaway PostgreSQL server for tests: `initdb` into a temporary directory, started on a
//! free port on 127.0.0.1, stopped and deleted when dropped. Uses the system's binaries
//! (`apt-get install postgresql`); run as root, it runs the server as the `postgres` user,
//! since PostgreSQL refuses to run as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

/// A running PostgreSQL; stopped when dropped.
pub struct TestPostgres {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    pub port: u16,
    /// The server's options (`pg_ctl -o`), for starting it again.
    options: String,
}

/// The directory with `initdb` and `pg_ctl`: on `PATH`, else Debian's /usr/lib/postgresql/<v>/bin.
pub fn postgres_bin_dir() -> Result<PathBuf> {
    if let Ok(output) = Command::new("sh")
        .args(["-c", "command -v pg_ctl"])
        .output()
    {
        let path = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if output.status.success() && !path.is_empty() {
            if let Some(dir) = std::fs::canonicalize(&path)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
            {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|p| p.join("pg_ctl").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().context(
        "PostgreSQL's server binaries are not installed: run `sudo apt-get install -y postgresql` (make test does this when it can)",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl TestPostgres {
    /// A server for tests: durability off (no fsync, asynchronous commit), since a test's
    /// data dies with it and the machine's disk is shared with everything else.
    pub fn start(name: &str) -> Result<TestPostgres> {
        TestPostgres::start_with(name, false)
    }

    /// A server with PostgreSQL's default durability (fsync, synchronous commit), for
    /// benchmarks whose figures must hold in production.
    pub fn start_durable(name: &str) -> Result<TestPostgres> {
        TestPostgres::start_with(name, true)
    }

    fn start_with(name: &str, durable: bool) -> Result<TestPostgres> {
        let bin = postgres_bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "tollgate-pg-{name}-{}-{}",
            std::process::id(),
            crate::ports::unused_port()?
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let as_postgres = is_root();
        if as_postgres {
            run(
                Command::new("chown").arg("-R").arg("postgres:").arg(&dir),
                "chown",
            )?;
        }
        let mut pg = TestPostgres {
            dir,
            bin,
            as_postgres,
            port: 0,
            options: String::new(),
        };
        let data = pg.dir.join("data");
        pg.run_tool(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-A",
                "trust",
                "-U",
                "tollgate",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        // A free port can be taken between our probe and the server's bind: retry a few times.
        for _ in 0..5 {
            pg.port = crate::ports::unused_port()?;
            let mut options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1",
                pg.port,
                pg.dir.display()
            );
            if !durable {
                options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
            }
            pg.options = options;
            if pg.start_again().is_ok() {
                return Ok(pg);
            }
        }
        let log = std::fs::read_to_string(pg.dir.join("postgres.log")).unwrap_or_default();
        bail!("PostgreSQL did not start:\n{log}")
    }

    fn run_tool(&self, tool: &str, args: &[&str]) -> Result<Output> {
        let path = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        command.args(args).current_dir(&self.dir);
        run(&mut command, tool)
    }

    /// `postgres://tollgate@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://tollgate@127.0.0.1:{}/postgres", self.port)
    }

    /// Restart the server the hard way (immediate shutdown: every connection is cut, as in a
    /// crash), with the same options and port.
    pub fn restart(&self) -> Result<()> {
        let data = self.dir.join("data");
        let log = self.dir.join("postgres.log");
        self.run_tool(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &log.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "-t",
                "30",
                "restart",
            ],
        )
        .map(|_| ())
    }

    /// Start the server (again, after [`TestPostgres::stop`]) with its options and port.
    pub fn start_again(&self) -> Result<()> {
        let data = self.dir.join("data");
        let log = self.dir.join("postgres.log");
        self.run_tool(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-o",
                &self.options,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        )
        .map(|_| ())
    }

    /// Stop the server (immediate shutdown).
    pub fn stop(&self) -> Result<()> {
        let data = self.dir.join("data");
        self.run_tool(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
        .map(|_| ())
    }
}

fn run(command: &mut Command, what: &str) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
