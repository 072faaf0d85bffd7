use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{
    ApiError, State,
    extract::{Json, Path},
};
use crate::{
    auth::Caller,
    store::{EventBody, Role},
};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// viewer, operator or admin.
    #[schema(pattern = "^(viewer|operator|admin)$")]
    pub role: String,
    #[serde(default)]
    pub description: String,
}

fn audit(state: &State, caller: &Caller, what: String) -> Result<(), ApiError> {
    state.orchestrator.record(EventBody {
        kind: "token".into(),
        actor: caller.actor(),
        device: None,
        from: None,
        to: Some(what),
        generation: None,
        result: "ok".into(),
        duration_us: None,
        detail: Value::Null,
    })?;
    Ok(())
}

/// Create a token (admin). Its secret is shown once, in this response.
#[utoipa::path(post, path = "/tokens", request_body = CreateToken, responses((status = 201)), security(("bearer" = [])))]
pub async fn create(
    state: State,
    caller: Caller,
    Json(req): Json<CreateToken>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Role::Admin)?;
    let role: Role = req
        .role
        .parse()
        .map_err(|e: String| ApiError::from(crate::model::FieldError::new("role", e)))?;
    let st = state.clone();
    let (record, token) =
        tokio::task::spawn_blocking(move || st.auth.create(role, &req.description))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
    audit(
        &state,
        &caller,
        format!("created {} ({:?})", record.id, record.role),
    )?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": record.id, "role": record.role, "token": token })),
    ))
}

/// List tokens (admin): never their secrets or hashes.
#[utoipa::path(get, path = "/tokens", responses((status = 200)), security(("bearer" = [])))]
pub async fn list(state: State, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin)?;
    let items: Vec<Value> = state
        .auth
        .list()?
        .into_iter()
        .map(|t| json!({ "id": t.id, "role": t.role, "description": t.description, "created": t.created, "revoked": t.revoked }))
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// Revoke a token (admin).
#[utoipa::path(delete, path = "/tokens/{id}", params(("id" = String, Path)), responses((status = 204), (status = 404)), security(("bearer" = [])))]
pub async fn revoke(
    state: State,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    state.auth.revoke(&id)?;
    audit(&state, &caller, format!("revoked {id}"))?;
    Ok(StatusCode::NO_CONTENT)
}
