//! From HTTP to the gRPC services and back: the request a route hands a service (the
//! caller's `Authorization` header as gRPC metadata, a deadline), and gRPC codes as HTTP
//! statuses with Flink's error body `{"errors": ["..."]}`.

use std::time::Duration;

use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tonic::metadata::AsciiMetadataValue;
use tonic::Code;

use crate::server::auth::AUTHORIZATION;

/// The deadline an HTTP call gets at the edge (HTTP carries none of its own).
pub const HTTP_DEADLINE: Duration = Duration::from_secs(10);

/// A gRPC request carrying the HTTP caller's token and [`HTTP_DEADLINE`].
pub fn request<T>(headers: &HeaderMap, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        // A header that is not visible ASCII cannot be a bearer token: leave it out,
        // and the edge answers as for a call without a token.
        if let Ok(v) = AsciiMetadataValue::try_from(v.as_bytes()) {
            r.metadata_mut().insert(AUTHORIZATION, v);
        }
    }
    r.set_timeout(HTTP_DEADLINE);
    r
}

/// An error answer in Flink's shape.
#[derive(Debug)]
pub struct HttpError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The message, the only element of `errors`.
    pub message: String,
}

impl HttpError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }

    /// 400 with a message naming the parameter.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

/// The HTTP status of a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl From<tonic::Status> for HttpError {
    fn from(s: tonic::Status) -> Self {
        HttpError::new(http_status(s.code()), s.message())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "errors": [self.message] }));
        if self.status == StatusCode::UNAUTHORIZED {
            // Tells a browser or script which scheme to use (never a realm with data).
            return (self.status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response();
        }
        (self.status, body).into_response()
    }
}

/// Flink's answer to a path it does not know.
pub async fn not_found(method: Method, uri: Uri) -> HttpError {
    HttpError::new(
        StatusCode::NOT_FOUND,
        format!("Not found: {method} {}", uri.path()),
    )
}

/// Gives every error answer Flink's shape, also those axum makes itself before a
/// handler runs (a path that does not decode, a query it cannot parse, a method a route
/// does not have): their text becomes the one element of `errors`.
pub async fn flink_error_shape(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    // axum's own rejections are short texts; a larger body is not one of them.
    let text = match axum::body::to_bytes(resp.into_body(), 64 * 1024).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text
    };
    HttpError::new(status, message).into_response()
}
