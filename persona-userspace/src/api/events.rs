use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    ApiError, State,
    extract::{Json, Query},
};
use crate::{auth::Caller, store::Role};

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Only events after this sequence number.
    #[serde(default)]
    after: u64,
    #[serde(default = "default_limit")]
    limit: usize,
    /// Seconds to wait for a new event when there is none yet (long poll, at most 60).
    #[serde(default)]
    wait: u64,
}

fn default_limit() -> usize {
    100
}

/// The audit log (viewer); with `wait`, a long poll for what comes next.
#[utoipa::path(get, path = "/events", params(("after" = Option<u64>, Query), ("limit" = Option<usize>, Query), ("wait" = Option<u64>, Query)), responses((status = 200)), security(("bearer" = [])))]
pub async fn list(
    state: State,
    caller: Caller,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = q.limit.clamp(1, 1000);
    let mut rx = state.orchestrator.subscribe();
    let store = state.orchestrator.store();
    let mut events = store.events(q.after, limit)?;
    // Past the cap, a long poll is answered at once with what there is: the client
    // polls again, and the daemon holds no more connections than it chose to.
    let waits = events.is_empty() && q.wait > 0;
    if let Some(Ok(_slot)) = waits.then(|| state.waiting.try_acquire()) {
        let wait = Duration::from_secs(q.wait.min(60));
        let _ = tokio::time::timeout(wait, async {
            while let Ok(e) = rx.recv().await {
                if e.seq > q.after {
                    break;
                }
            }
        })
        .await;
        events = store.events(q.after, limit)?;
    }
    Ok(Json(json!({ "items": events })))
}
