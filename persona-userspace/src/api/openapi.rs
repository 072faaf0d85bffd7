use axum::Json;
use serde_json::Value;
use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use super::{ApiError, State, context, events, objects, shift, tokens};
use crate::{auth::Caller, store::Role};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "persona", description = "Switchable network personas for virtual machines"),
    paths(
        objects::list_personas, objects::create_persona, objects::get_persona, objects::put_persona, objects::delete_persona,
        objects::list_devices, objects::create_device, objects::get_device, objects::put_device, objects::delete_device,
        objects::status,
        objects::list_rules,
        objects::create_rule,
        objects::get_rule,
        objects::put_rule,
        objects::delete_rule,
        objects::list_applications,
        objects::create_application,
        objects::get_application,
        objects::put_application,
        objects::delete_application,
        context::push,
        context::explain, shift::trigger_shift, events::list, tokens::create, tokens::list, tokens::revoke,
    ),
    components(schemas(shift::ShiftRequest, tokens::CreateToken)),
    modifiers(&BearerAuth)
)]
struct Doc;

/// The OpenAPI document of this API (viewer).
pub async fn document(_state: State, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Viewer)?;
    serde_json::to_value(Doc::openapi())
        .map(Json)
        .map_err(|e| ApiError::internal(e.to_string()))
}
