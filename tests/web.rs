//! The pages the engine serves itself, over real sockets: every page and
//! asset comes from the binary with its content type and cache headers, and
//! nothing in them points anywhere but the engine.

mod common;

use common::http_get;

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_and_asset_is_served_from_the_binary_with_its_type() {
    let engine = common::engine(|_| {}).await;
    let addr = engine.local_addr();
    let files = ridelock::web::files();
    for expected in [
        "index.html",
        "rider.html",
        "driver.html",
        "ops.html",
        "ops.js",
        "rider.js",
        "map.js",
        "style.css",
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "{expected} is not embedded: {files:?}"
        );
    }
    for (path, kind) in [
        ("/", "text/html; charset=utf-8"),
        ("/rider", "text/html; charset=utf-8"),
        ("/driver", "text/html; charset=utf-8"),
        ("/ops", "text/html; charset=utf-8"),
    ] {
        let response = http_get(addr, path).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
        assert_eq!(header(&response, "content-type"), Some(kind), "{path}");
        assert_eq!(
            header(&response, "cache-control"),
            Some("no-cache"),
            "{path}"
        );
        assert!(body(&response).contains("ridelock"), "{path}");
    }
    for file in files.iter().filter(|f| !f.ends_with(".html")) {
        let response = http_get(addr, &format!("/assets/{file}")).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{file}: {response}");
        let kind = header(&response, "content-type").unwrap_or_default();
        let expected = match file.rsplit('.').next() {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            other => panic!("an asset of an unexpected kind: {other:?}"),
        };
        assert_eq!(kind, expected, "{file}");
        let etag = header(&response, "etag").expect("an ETag").to_string();
        assert!(etag.starts_with('"'), "{file}");
        assert_eq!(
            header(&response, "cache-control"),
            Some("no-cache"),
            "{file}"
        );
        assert_eq!(header(&response, "x-content-type-options"), Some("nosniff"));
        // Revalidated by its ETag: unchanged, 304 and no body; another tag
        // (an older version), the whole file again.
        let ask = |tag: &str| {
            format!("GET /assets/{file} HTTP/1.1\r\nHost: x\r\nIf-None-Match: {tag}\r\n\r\n")
        };
        let again = common::http_raw(addr, &ask(&etag)).await;
        assert!(again.starts_with("HTTP/1.1 304"), "{file}: {again}");
        assert!(body(&again).is_empty(), "{file}");
        let other = common::http_raw(addr, &ask("\"0123\"")).await;
        assert!(other.starts_with("HTTP/1.1 200"), "{file}: {other}");
    }
    // Nothing else is served from there: not the pages twice, not files
    // outside the folder.
    for path in [
        "/assets/index.html",
        "/assets/../Cargo.toml",
        "/assets/nope.js",
        "/rider.html",
    ] {
        let response = http_get(addr, path).await;
        assert!(response.starts_with("HTTP/1.1 404"), "{path}: {response}");
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_page_refers_to_an_outside_address() {
    let engine = common::engine(|_| {}).await;
    let addr = engine.local_addr();
    let mut paths = vec![
        "/".to_string(),
        "/rider".into(),
        "/driver".into(),
        "/ops".into(),
    ];
    paths.extend(
        ridelock::web::files()
            .into_iter()
            .filter(|f| !f.ends_with(".html"))
            .map(|f| format!("/assets/{f}")),
    );
    for path in paths {
        let response = http_get(addr, &path).await;
        let text = body(&response);
        for outside in [
            "http://",
            "https://",
            "src=\"//",
            "href=\"//",
            "url(//",
            "from \"//",
        ] {
            assert!(!text.contains(outside), "{path} refers to {outside}…");
        }
        // And the page allows nothing else either.
        let policy = header(&response, "content-security-policy").unwrap_or_default();
        assert!(policy.contains("default-src 'self'"), "{path}: {policy}");
    }
    engine.shutdown().await;
}
