//! The pages the engine serves itself: `/` (what ridelock is), `/rider` and
//! `/driver` (reference apps), `/ops` (the operations map), and their assets under `/assets/`. The files
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
/// cache headers. Everything is revalidated on every use (`no-cache`) by
/// its ETag, the file's hash: asset names carry no version, so a page must
/// never run an older script after an upgrade. A request whose
/// `If-None-Match` names the current ETag gets 304 with no body.
pub fn page(path: &str, if_none_match: Option<&str>) -> Option<Response<Vec<u8>>> {
    let file = match path {
        "/" => "index.html",
        "/rider" => "rider.html",
        "/driver" => "driver.html",
        "/ops" => "ops.html",
        _ => path
            .strip_prefix("/assets/")
            .filter(|f| !f.ends_with(".html"))?,
    };
    let embedded = Files::get(file)?;
    let hash: String = embedded.metadata.sha256_hash()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let etag = format!("\"{hash}\"");
    let unchanged = if_none_match.is_some_and(|tags| {
        tags.split(',')
            .any(|t| t.trim().trim_start_matches("W/") == etag || t.trim() == "*")
    });
    let mut response = Response::new(if unchanged {
        Vec::new()
    } else {
        embedded.data.into_owned()
    });
    *response.status_mut() = if unchanged {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
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
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(etag) = HeaderValue::from_str(&etag) {
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
    Some(response)
}

/// Every embedded file's name (for tests).
pub fn files() -> Vec<String> {
    Files::iter().map(|f| f.to_string()).collect()
}
