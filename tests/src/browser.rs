//! Headless Chromium for dashboard tests, driven over WebDriver: starts `chromedriver`
//! on a free loopback port and opens one session, then offers the few commands the
//! tests need (go to a URL, find by CSS selector, click, type, run a script, take a
//! screenshot). A minimal client over reqwest and plain HTTP: WebDriver is a handful of
//! JSON requests, and a full client library would bring a TLS stack the tests never
//! use.
//!
//! Install Chromium and its driver with `scripts/deps-browser.sh` (Debian's `chromium`
//! and `chromium-driver`). [`Browser::start`] fails, naming that script, when they are
//! missing: a browser test is not skipped.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};

use crate::harness::free_port;

/// The W3C name of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where Debian puts the real Chromium binary (`/usr/bin/chromium` is a wrapper script).
const CHROMIUM_CANDIDATES: [&str; 4] = [
    "/usr/lib/chromium/chromium",
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
    "/usr/bin/google-chrome",
];

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A headless Chromium session; chromedriver and the browser end with it.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a `width`×`height` window that
    /// trusts the TLS certificate `controller` serves now (and no other untrusted one):
    /// Chromium is given the certificate's public key to accept, as a browser would be
    /// once its user imported the cluster CA.
    pub async fn start(
        width: u32,
        height: u32,
        controller: &crate::harness::Controller,
    ) -> Result<Browser> {
        let spki = controller.spki_sha256_base64().await?;
        let missing = || {
            anyhow!(
                "chromium and chromedriver are needed for the dashboard browser test: run scripts/deps-browser.sh (apt-get install chromium chromium-driver)"
            )
        };
        let driver_bin = which("chromedriver").ok_or_else(missing)?;
        let chromium = CHROMIUM_CANDIDATES
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .ok_or_else(missing)?;
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", driver_bin.display()))?;
        let profile = tempfile::tempdir().context("browser profile dir")?;
        let mut b = Browser {
            driver,
            port,
            session: String::new(),
            http: crate::http(),
            _profile: profile,
        };
        // chromedriver takes a moment to listen.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = b.http.get(b.url("/status")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not answer on port {port} within 20s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Tests run as root in containers: no sandbox, no /dev/shm reliance.
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--force-device-scale-factor=1",
                    format!("--window-size={width},{height}"),
                    format!("--ignore-certificate-errors-spki-list={spki}"),
                    format!("--user-data-dir={}", b._profile.path().display()),
                ],
            },
        }}});
        let v = b
            .request(reqwest::Method::POST, "/session", Some(caps))
            .await?;
        b.session = v["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session id in {v}"))?
            .to_string();
        Ok(b)
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// One WebDriver command; its `value`, or the driver's error.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req
            .send()
            .await
            .with_context(|| format!("WebDriver {method} {path}"))?;
        let status = r.status();
        let v: Value = r.json().await.context("WebDriver answer is not JSON")?;
        if !status.is_success() {
            bail!(
                "WebDriver {method} {path}: {status}: {} {}",
                v["value"]["error"],
                v["value"]["message"]
            );
        }
        Ok(v["value"].clone())
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Loads a URL and waits for the page.
    pub async fn goto(&self, url: &str) -> Result<()> {
        self.request(
            reqwest::Method::POST,
            &self.session_path("/url"),
            Some(json!({ "url": url })),
        )
        .await?;
        Ok(())
    }

    /// The first element matching `css`, if any.
    pub async fn find(&self, css: &str) -> Result<Option<String>> {
        let r = self
            .http
            .post(self.url(&self.session_path("/element")))
            .json(&json!({"using": "css selector", "value": css}))
            .send()
            .await?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() {
            bail!("find {css}: {status}: {v}");
        }
        Ok(v["value"][ELEMENT].as_str().map(str::to_string))
    }

    /// Waits until an element matching `css` exists; its reference.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.find(css).await? {
                return Ok(e);
            }
            if Instant::now() > deadline {
                let body = self.text("body").await.unwrap_or_default();
                bail!("no element {css:?} within {timeout:?}; the page says:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until no element matches `css`.
    pub async fn wait_gone(&self, css: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.find(css).await?.is_some() {
            if Instant::now() > deadline {
                bail!("element {css:?} still there after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The visible text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> Result<String> {
        let v = self
            .on_element(css, "text", reqwest::Method::GET, None)
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Clicks the first element matching `css`.
    pub async fn click(&self, css: &str) -> Result<()> {
        self.on_element(css, "click", reqwest::Method::POST, Some(json!({})))
            .await?;
        Ok(())
    }

    /// Types into the first element matching `css`.
    pub async fn type_into(&self, css: &str, text: &str) -> Result<()> {
        self.on_element(
            css,
            "value",
            reqwest::Method::POST,
            Some(json!({ "text": text })),
        )
        .await?;
        Ok(())
    }

    /// One command on the first element matching `css`. The dashboard redraws parts of
    /// the page as the cluster changes, so the element found may be replaced before the
    /// command reaches it ("stale element reference"): then it is found again, as a user's
    /// click lands on whatever is on the screen at that instant.
    async fn on_element(
        &self,
        css: &str,
        command: &str,
        method: reqwest::Method,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut tries = 0;
        loop {
            let e = self
                .find(css)
                .await?
                .ok_or_else(|| anyhow!("no element {css:?} for {command}"))?;
            let path = self.session_path(&format!("/element/{e}/{command}"));
            match self.request(method.clone(), &path, body.clone()).await {
                Err(err) if tries < 10 && err.to_string().contains("stale element reference") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// Runs a script in the page (`return …` for a value).
    pub async fn exec(&self, script: &str) -> Result<Value> {
        self.request(
            reqwest::Method::POST,
            &self.session_path("/execute/sync"),
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Saves a PNG screenshot of the window, creating the directory.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let v = self
            .request(
                reqwest::Method::GET,
                &self.session_path("/screenshot"),
                None,
            )
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .context("screenshot is not base64")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session makes chromedriver close Chromium; a killed chromedriver
        // would leave the browser running. Plain blocking HTTP: Drop cannot await.
        if !self.session.is_empty() {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(
                    s,
                    "DELETE /session/{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    self.session, self.port
                );
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
