//! Write the seed corpus: `tollgate-fuzz-seeds <corpus dir>` (run by `fuzz/run.sh seeds`).
//! Files are named by what they hold; the ones libFuzzer adds are named by their hash.

fn main() {
    let root = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .expect("usage: tollgate-fuzz-seeds <corpus dir>");
    for (target, name, bytes) in tollgate_fuzz_common::seeds::all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("seed file");
    }
}
