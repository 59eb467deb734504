//! Waiting on what may be absent (a timer not set, a tty not open, a client not attached): its
//! future when present, never ready otherwise, so a `select!` branch simply sleeps.

/// `f`'s output when there is one; never ready when `f` is None.
pub async fn or_never<F: Future>(f: Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
