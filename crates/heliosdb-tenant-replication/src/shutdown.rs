//! The shutdown signal every long-running task watches. Shared vocabulary:
//! depends on no other module of the crate.

use tokio::sync::watch;

/// `true` once shutdown was requested.
pub type Shutdown = watch::Receiver<bool>;

/// Resolves once shutdown is requested (holding no guard across awaits).
pub async fn stopped(shutdown: &mut Shutdown) {
    let _ = shutdown.wait_for(|s| *s).await;
}
