//! The built-in web pages (`/inspector`, `/status`) and their files, embedded in the binary at
//! build time: nothing to install, nothing fetched from elsewhere. Pure: a path in, an asset out.
//!
//! The pages talk to the server only through its public endpoints (the WebSocket, REST
//! broadcast and `GET /api/status`), like any other client. Every response carries a
//! Content-Security-Policy that allows only this origin, so a page cannot make an external
//! request even by mistake.

/// One embedded file.
#[derive(Debug, PartialEq, Eq)]
pub struct Asset {
    /// The path it is served at.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

const ASSETS: &[Asset] = &[
    Asset { path: "/inspector", content_type: HTML, body: include_bytes!("../assets/inspector.html") },
    Asset { path: "/status", content_type: HTML, body: include_bytes!("../assets/status.html") },
    Asset { path: "/assets/app.css", content_type: CSS, body: include_bytes!("../assets/app.css") },
    Asset { path: "/assets/phoenix.js", content_type: JS, body: include_bytes!("../assets/phoenix.js") },
    Asset { path: "/assets/inspector.js", content_type: JS, body: include_bytes!("../assets/inspector.js") },
    Asset { path: "/assets/status.js", content_type: JS, body: include_bytes!("../assets/status.js") },
    Asset { path: "/assets/chart.js", content_type: JS, body: include_bytes!("../assets/chart.js") },
];

/// Extra headers of every page response: same-origin only, no framing, no caching of stale UI.
pub const PAGE_HEADERS: &str = "Content-Security-Policy: default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\nX-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\nCache-Control: no-cache\r\n";

/// The asset served at `path` (without a trailing slash), if any.
pub fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|asset| asset.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_found_and_not_empty() {
        for asset in ASSETS {
            assert_eq!(find(asset.path), Some(asset));
            assert!(!asset.body.is_empty(), "{}", asset.path);
        }
        assert_eq!(find("/assets/nope.js"), None);
        assert_eq!(find("/assets"), None);
    }

    #[test]
    fn pages_load_nothing_from_elsewhere() {
        for asset in ASSETS {
            // XML namespace names look like URLs but are never fetched.
            let text = std::str::from_utf8(asset.body).expect("assets are UTF-8").replace("http://www.w3.org/", "");
            for needle in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(needle), "{} mentions {needle}", asset.path);
            }
        }
    }
}
