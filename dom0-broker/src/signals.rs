//! The one wait for a stop: SIGTERM (OpenRC's stop) or SIGINT (Ctrl-C), for the service and the
//! centre's login check.

/// Returns when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
