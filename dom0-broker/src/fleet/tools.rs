//! The entry of `dom0-broker fleet ...` and `render-bridge`: a runtime for the operator's tools,
//! their output and exit codes.

use std::io::Read as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::FleetCmd;
use crate::fleet::{bridge_conf, centre, login, operator};
use crate::signals::shutdown_signal;

/// Bad usage or configuration (sysexits' EX_USAGE).
const EX_USAGE: u8 = 64;
/// A service could not start (EX_UNAVAILABLE).
const EX_UNAVAILABLE: u8 = 69;

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("dom0-broker: {message}");
    ExitCode::from(code)
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(70, &format!("cannot start the runtime: {e}")))
}

/// `render-bridge --config FILE`.
pub fn render_bridge(config: &Path) -> ExitCode {
    let file = match crate::config::load_file(config) {
        Ok(f) => f,
        Err(e) => return fail(EX_USAGE, &e.to_string()),
    };
    let Some(fleet) = file.fleet else {
        return fail(
            EX_USAGE,
            &format!("{}: no [fleet] section", config.display()),
        );
    };
    let f = match fleet.validate() {
        Ok(f) => f,
        Err(e) => return fail(EX_USAGE, &e.to_string()),
    };
    match centre::read_password(&f.password_file) {
        Ok(pw) => {
            print!("{}", bridge_conf::render(&f, &pw));
            ExitCode::SUCCESS
        }
        Err(e) => fail(EX_USAGE, &format!("[fleet] {e}")),
    }
}

/// `fleet ...`.
pub fn run(cmd: FleetCmd) -> ExitCode {
    let rt = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match cmd {
        FleetCmd::Status {
            centre,
            hosts,
            wait_ms,
            json,
        } => match rt.block_on(operator::status(
            &centre,
            &hosts,
            Duration::from_millis(wait_ms),
            json,
        )) {
            Ok((out, code)) => {
                print!("{out}");
                ExitCode::from(code)
            }
            Err(e) => fail(topics::call_output::LOCAL_FAILURE, &e.0),
        },
        FleetCmd::Call {
            centre,
            timeout_ms,
            json,
            repeat,
            host,
            vm,
            command,
            args,
        } => {
            let out = rt.block_on(operator::call(
                &centre,
                &host,
                &vm,
                &command,
                &args,
                Duration::from_millis(timeout_ms),
                json,
                repeat,
            ));
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            ExitCode::from(out.code)
        }
        FleetCmd::LoginCheck { listen, users } => {
            if let Err(e) = login::Users::load(&users) {
                return fail(EX_USAGE, &e.to_string());
            }
            init_logging();
            let stop = CancellationToken::new();
            let tasks = TaskTracker::new();
            let served = rt.block_on(async {
                let r = tokio::select! {
                    r = login::run(listen, &users, tasks.clone(), stop.clone()) => r,
                    _ = shutdown_signal() => Ok(()),
                };
                stop.cancel();
                tasks.close();
                let _ = tokio::time::timeout(Duration::from_millis(900), tasks.wait()).await;
                r
            });
            match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(EX_UNAVAILABLE, &format!("login check on {listen}: {e}")),
            }
        }
        FleetCmd::HashPassword { user } => {
            let mut pw = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut pw) {
                return fail(EX_USAGE, &format!("standard input: {e}"));
            }
            let pw = pw.lines().next().unwrap_or("");
            if pw.is_empty() || user.is_empty() || user.contains(char::is_whitespace) {
                return fail(EX_USAGE, "a user name and a password on standard input");
            }
            let mut salt = [0u8; 8];
            let _ = getrandom::getrandom(&mut salt);
            let salt: String = salt.iter().map(|b| format!("{b:02x}")).collect();
            println!("{}", login::users_line(&user, &salt, pw));
            ExitCode::SUCCESS
        }
    }
}

fn init_logging() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}
