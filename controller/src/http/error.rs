//! The one error answer of the API: an HTTP status and `{code, message, details}`, made
//! from the domain's and the state layer's errors.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bramble_api::rest::ApiErrorBody;

use crate::core::DomainError;
use crate::state;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ApiErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ApiErrorBody {
                code: code.into(),
                message: message.into(),
                details: Vec::new(),
            },
        }
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 409.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    /// 401.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid bearer token",
        )
    }
    /// 403: a valid token that may not do this.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 503.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    /// 503 from a controller that is not the leader, for what only the leader does.
    pub fn not_leader(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_leader", message)
    }
    /// 500.
    pub fn internal(code: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, code, message)
    }
    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<DomainError> for ApiError {
    fn from(e: DomainError) -> ApiError {
        let message = e.to_string();
        match e {
            DomainError::InvalidManifest(details) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                body: ApiErrorBody {
                    code: "invalid_manifest".into(),
                    message,
                    details,
                },
            },
            DomainError::NotFound { .. } => ApiError::not_found(message),
            DomainError::Conflict(_) => ApiError::conflict(message),
            DomainError::BadRequest(_) => ApiError::bad_request(message),
            DomainError::Unavailable(_) => ApiError::unavailable(message),
        }
    }
}

pub use crate::core::error::chain;

impl From<state::Error> for ApiError {
    fn from(e: state::Error) -> ApiError {
        match e {
            state::Error::Domain(d) => d.into(),
            state::Error::NotLeader => ApiError::not_leader("this controller is not the leader"),
            other => {
                let message = chain(&other);
                tracing::error!(error = %message, "internal failure");
                ApiError::internal("store", format!("store failure: {message}"))
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_errors_map_to_statuses() {
        let cases = [
            (
                DomainError::InvalidManifest(Vec::new()),
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (DomainError::not_found("node", "pi9"), StatusCode::NOT_FOUND),
            (DomainError::Conflict("x".into()), StatusCode::CONFLICT),
            (DomainError::BadRequest("x".into()), StatusCode::BAD_REQUEST),
            (
                DomainError::Unavailable("x".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ];
        for (e, status) in cases {
            assert_eq!(ApiError::from(e).status(), status);
        }
    }
}
