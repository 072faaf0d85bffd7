use std::time::Duration;

use axum::http::StatusCode;
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

impl EventsQuery {
    /// What the document declares, enforced: a value outside it is refused, not clamped.
    fn check(&self) -> Result<(), ApiError> {
        let refuse = |field: &str, reason: &str| {
            Err(ApiError {
                field: Some(field.into()),
                ..ApiError::new(StatusCode::BAD_REQUEST, format!("{field}: {reason}"))
            })
        };
        if self.after > i64::MAX as u64 {
            return refuse("after", "no sequence number is above 2^63-1");
        }
        if !(1..=1000).contains(&self.limit) {
            return refuse("limit", "from 1 to 1000 events");
        }
        if self.wait > MAX_WAIT {
            return refuse("wait", "a long poll waits at most 60 seconds");
        }
        Ok(())
    }
}

const MAX_WAIT: u64 = 60;

/// The audit log (viewer); with `wait`, a long poll for what comes next.
#[utoipa::path(get, path = "/events", params(
    ("after" = Option<i64>, Query, minimum = 0, description = "Only events after this sequence number"),
    ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "At most this many events (100)"),
    ("wait" = Option<u32>, Query, minimum = 0, maximum = 60, description = "Seconds to wait for an event when there is none yet"),
), responses((status = 200)), security(("bearer" = [])))]
pub async fn list(
    state: State,
    caller: Caller,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Viewer)?;
    q.check()?;
    let limit = q.limit;
    let mut rx = state.orchestrator.subscribe();
    let store = state.orchestrator.store();
    let mut events = store.events(q.after, limit)?;
    // Past the cap, a long poll is answered at once with what there is: the client
    // polls again, and the daemon holds no more connections than it chose to.
    let waits = events.is_empty() && q.wait > 0;
    if let Some(Ok(_slot)) = waits.then(|| state.waiting.try_acquire()) {
        let wait = Duration::from_secs(q.wait);
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
