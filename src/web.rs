//! The pages the engine serves itself: `/` (what ridelock is), `/rider` and
//! `/driver` (reference apps), and their assets under `/assets/`. The files
//! live in `web/` and are embedded in the binary (rust-embed, in debug
//! builds too), so the engine serves them with no other file or service and
//! nothing is fetched from elsewhere at run time.

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "web/"]
struct Files;

/// The page or asset at `path`, if it is one: its bytes, content type and
/// cache headers (pages are revalidated every time, assets by their hash).
pub fn page(path: &str) -> Option<Response<Vec<u8>>> {
    let file = match path {
        "/" => "index.html",
        "/rider" => "rider.html",
        "/driver" => "driver.html",
        _ => path
            .strip_prefix("/assets/")
            .filter(|f| !f.ends_with(".html"))?,
    };
    let embedded = Files::get(file)?;
    let hash: String = embedded.metadata.sha256_hash()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut response = Response::new(embedded.data.into_owned());
    let headers = response.headers_mut();
    let mime = embedded.metadata.mimetype();
    // Text is UTF-8; say so, so that no browser guesses.
    let content_type = if mime.starts_with("text/") || mime.ends_with("javascript") {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    };
    if let Ok(value) = HeaderValue::from_str(&content_type) {
        headers.insert(header::CONTENT_TYPE, value);
    }
    let cache = if file.ends_with(".html") {
        "no-cache"
    } else {
        "public, max-age=3600, must-revalidate"
    };
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{hash}\"")) {
        headers.insert(header::ETAG, etag);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Only this engine's own scripts, styles and WebSocket.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    *response.status_mut() = StatusCode::OK;
    Some(response)
}

/// Every embedded file's name (for tests).
pub fn files() -> Vec<String> {
    Files::iter().map(|f| f.to_string()).collect()
}
