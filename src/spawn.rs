//! Work that must not stop half way when its caller stops waiting.

use crate::error::{Error, Result};

/// Runs `work` on a task of its own and waits for it: a caller that stops waiting (a client
/// that gave up, a dropped connection) does not stop it half way, say between a write and
/// what must follow it.
pub async fn to_the_end<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| Error::Storage(format!("stopped half way: {e}")))?
}
