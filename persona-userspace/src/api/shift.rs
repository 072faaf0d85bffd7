use serde::Deserialize;
use utoipa::ToSchema;

use super::{ApiError, State, extract::Json};
use crate::{auth::Caller, model::FlowMode, orchestrator::Outcome, store::Role};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShiftRequest {
    pub device_id: String,
    pub persona_id: String,
    /// Only compute and return the plan.
    #[serde(default)]
    pub dry_run: bool,
    /// What happens to flows open before the shift; the persona's `flows` (or `keep`)
    /// when not given.
    #[serde(default)]
    pub flows: Option<FlowMode>,
}

/// Shift a device to a persona (operator).
#[utoipa::path(post, path = "/trigger_shift", request_body = ShiftRequest, responses((status = 200, description = "Shifted, or the plan of a dry run"), (status = 404), (status = 409, description = "Another device holds the address"), (status = 502, description = "Failed at a step and undone")), security(("bearer" = [])))]
pub async fn trigger_shift(
    state: State,
    caller: Caller,
    Json(req): Json<ShiftRequest>,
) -> Result<Json<Outcome>, ApiError> {
    caller.require(Role::Operator)?;
    let outcome = state
        .orchestrator
        .shift(
            &req.device_id,
            &req.persona_id,
            &caller.actor(),
            req.dry_run,
            req.flows,
        )
        .await?;
    Ok(Json(outcome))
}
