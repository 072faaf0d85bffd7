use axum::Json;
use serde_json::Value;
use utoipa::{
    Modify, OpenApi,
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use super::{ApiError, State, context, events, migrate, objects, shift, tokens};
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

/// Every operation's error statuses, in the one error shape: what authorization, the
/// extractors and the handler can answer, each declared with the `Error` schema.
struct ErrorResponses;

impl Modify for ErrorResponses {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{
            ContentBuilder, Ref, RefOr, ResponseBuilder,
            schema::{ObjectBuilder, Schema, Type},
        };
        let components = doc.components.get_or_insert_with(Default::default);
        components.schemas.insert(
            "Error".into(),
            RefOr::T(Schema::Object(
                ObjectBuilder::new()
                    .property("error", ObjectBuilder::new().schema_type(Type::String))
                    .required("error")
                    .property(
                        "field",
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .description(Some("Where the input is wrong: spec.addresses[1]")),
                    )
                    .build(),
            )),
        );
        let content = || {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Error")))
                .build()
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            let named = path.contains('{');
            for (op, body) in [
                (&mut item.get, false),
                (&mut item.put, true),
                (&mut item.post, true),
                (&mut item.delete, false),
            ] {
                let Some(op) = op else { continue };
                let mut statuses = vec![
                    ("400", "A query string or path that does not parse"),
                    ("401", "No valid token"),
                    ("403", "The token's role is not enough"),
                    ("500", "The daemon failed"),
                ];
                if body {
                    statuses.extend([
                        ("413", "The body is too large"),
                        ("415", "The body is not JSON"),
                        ("422", "The body does not fit: `field` says where"),
                    ]);
                }
                if named {
                    statuses.push(("404", "No such object"));
                }
                let responses = &mut op.responses.responses;
                for (code, why) in statuses {
                    responses.entry(code.into()).or_insert_with(|| {
                        RefOr::T(ResponseBuilder::new().description(why).build())
                    });
                }
                for (code, r) in responses.iter_mut() {
                    if let RefOr::T(r) = r
                        && !code.starts_with('2')
                        && r.content.is_empty()
                    {
                        r.content
                            .insert("application/json".into(), RefOr::T(content()));
                    }
                }
            }
        }
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
        context::explain, shift::trigger_shift, migrate::migrate, migrate::cut_over, migrate::cancel, migrate::show, events::list, tokens::create, tokens::list, tokens::revoke,
    ),
    components(schemas(shift::ShiftRequest, migrate::MigrateRequest, tokens::CreateToken, objects::Body)),
    modifiers(&BearerAuth, &ErrorResponses)
)]
struct Doc;

/// The OpenAPI document of this API (viewer).
pub async fn document(_state: State, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Viewer)?;
    serde_json::to_value(Doc::openapi())
        .map(Json)
        .map_err(|e| ApiError::internal(e.to_string()))
}
