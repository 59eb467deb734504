//! `gen-man DIR`: the man pages (DIR/man1) and the bash, zsh and fish completions
//! (DIR/completions) of `dom0-broker` and `domu-agent`, generated from their clap definitions.
//! The APKBUILD installs them; `docs/operations.md` lists them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

fn generate(cmd: clap::Command, name: &str, dir: &std::path::Path) -> std::io::Result<()> {
    let man = dir.join("man1");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    let mut cmd = cmd;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, name, &completions)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let Some(dir) = std::env::args().nth(1).map(PathBuf::from) else {
        eprintln!("usage: gen-man DIR");
        return ExitCode::from(64);
    };
    let result = generate(dom0_broker::cli::Cli::command(), "dom0-broker", &dir)
        .and_then(|()| generate(domu_agent::cli::Cli::command(), "domu-agent", &dir));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen-man: {}: {e}", dir.display());
            ExitCode::from(70)
        }
    }
}
