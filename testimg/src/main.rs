//! `testimg`: the container every Bramble test runs. One small static binary (built for
//! `x86_64-unknown-linux-musl` and put into a `FROM scratch` image by
//! `bramble_tests::ensure_test_image`) that can behave like the workloads Bramble has
//! to deal with: serve, run to completion, fail, crash, hang, eat memory, log.
//!
//! ```text
//! testimg serve PORT [TEXT]        HTTP/1.1: GET / -> TEXT (default "hello from testimg"),
//!                                  GET /healthz -> "ok", GET /env/NAME -> $NAME (404 if unset)
//! testimg sleep SECS               sleep, then exit 0
//! testimg exit CODE [AFTER_SECS]   exit with CODE, after AFTER_SECS (default 0; fractions allowed)
//! testimg crash                    abort (SIGABRT, exit status 134)
//! testimg hang PORT AFTER_SECS     serve like `serve` until AFTER_SECS, then accept connections
//!                                  but never answer, staying alive (a hung daemon: HTTP probes
//!                                  time out, TCP probes still connect)
//! testimg eat MIB [AFTER_SECS]     after AFTER_SECS (default 0), allocate and touch MIB MiB,
//!                                  then sleep forever
//! testimg print TEXT [EVERY_MS] [COUNT]
//!                                  print "TEXT N" (N = 1, 2, …) every EVERY_MS (default 1000) ms;
//!                                  after COUNT lines (default: never) exit 0
//! testimg env                      print the environment as NAME=VALUE lines, sorted, then sleep
//!                                  forever
//! testimg get HOST:PORT [PATH]     one HTTP GET (default path /); print the body, exit 0, or the
//!                                  error on stderr, exit 1
//! testimg poll HOST:PORT PATH EVERY_MS
//!                                  resolve HOST once (as clients that cache forever do), then GET
//!                                  PATH on a new connection every EVERY_MS ms, printing
//!                                  "UNIX_MS ok BODY" or "UNIX_MS fail ERROR" per try
//! testimg hold HOST:PORT           resolve, connect, send nothing; print "UNIX_MS closed" when the
//!                                  other side closes, then keep polling nothing: exit 0
//! testimg rtt HOST:PORT N          N GETs of /healthz, each on a new connection, one after another;
//!                                  print "p50_us p99_us mean_us"
//! testimg sink PORT                accept connections, read and drop what comes, answer the count
//!                                  of bytes when the sender closes its side
//! testimg blast HOST:PORT MIB      send MIB MiB to a sink; print "MiB/s"
//! testimg write PATH TEXT         write TEXT to PATH
//! testimg cat PATH                 print PATH's bytes (exit 1 if it cannot be read)
//! testimg copy FROM TO             copy FROM to TO.part, then rename it to TO (a backup command)
//! testimg fill PATH MIB            write MIB MiB of pseudo-random bytes to PATH
//! testimg churn PATH KIB PAUSE_MS rewrite PATH in place forever, each version KIB KiB of one
//!                                  byte value, pausing PAUSE_MS between versions
//! testimg touch PATH | rm PATH | exists PATH
//!                                  make or remove an empty file; exists exits 0 if it is there,
//!                                  1 if not (a readiness switch for exec probes)
//! ```
//!
//! As PID 1 in a container the kernel ignores signals with the default disposition, so a
//! program that does not handle SIGTERM is only stopped by Docker's SIGKILL after the grace
//! period. testimg handles SIGTERM and SIGINT and exits 0 at once (a graceful stop is a
//! success), which keeps the tests fast. With `TESTIMG_IGNORE_SIGTERM=1` in its
//! environment it does not, and only the grace's SIGKILL stops it, as a careless program.
//!
//! Start-up lines and `exit`'s farewell go to stderr, payload lines to stdout, so log tests
//! can check that both streams arrive.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

const USAGE: &str =
    "usage: testimg serve PORT [TEXT] | sleep SECS | exit CODE [AFTER_SECS] | crash | \
hang PORT AFTER_SECS | eat MIB [AFTER_SECS] | print TEXT [EVERY_MS] [COUNT] | now | env | get HOST:PORT [PATH] | \
poll HOST:PORT PATH EVERY_MS | hold HOST:PORT | rtt HOST:PORT N | sink PORT | \
blast HOST:PORT MIB | touch PATH | rm PATH | exists PATH | echo-stdin | isatty";

fn main() -> ExitCode {
    if std::env::var_os("TESTIMG_IGNORE_SIGTERM").is_none_or(|v| v != "1") {
        exit_on_sigterm();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match run(&args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("testimg: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Installs the SIGTERM/SIGINT handler: a thread that exits the process on the first one.
fn exit_on_sigterm() {
    match Signals::new([SIGTERM, SIGINT]) {
        Ok(mut signals) => {
            thread::spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    eprintln!("testimg: signal {sig}, exiting");
                    std::process::exit(0);
                }
            });
        }
        // Without the handler the program still works; it is just slow to stop.
        Err(e) => eprintln!("testimg: cannot handle SIGTERM: {e}"),
    }
}

fn run(args: &[&str]) -> Result<ExitCode, String> {
    match args {
        ["serve", port, rest @ ..] if rest.len() <= 1 => {
            let text = rest.first().copied().unwrap_or("hello from testimg");
            serve(parse(port, "PORT")?, text, None)
        }
        ["sleep", secs] => {
            thread::sleep(secs_arg(secs)?);
            Ok(ExitCode::SUCCESS)
        }
        ["exit", code, rest @ ..] if rest.len() <= 1 => {
            let code: u8 = parse(code, "CODE")?;
            if let Some(after) = rest.first() {
                thread::sleep(secs_arg(after)?);
            }
            eprintln!("testimg: exiting with code {code}");
            Ok(ExitCode::from(code))
        }
        ["crash"] => {
            eprintln!("testimg: crashing");
            std::process::abort()
        }
        ["hang", port, after] => {
            let after = secs_arg(after)?;
            serve(parse(port, "PORT")?, "hello from testimg", Some(after))
        }
        ["eat", mib, rest @ ..] if rest.len() <= 1 => {
            let mib = parse(mib, "MIB")?;
            if let Some(after) = rest.first() {
                thread::sleep(secs_arg(after)?);
            }
            eat(mib);
            sleep_forever()
        }
        ["print", text, rest @ ..] if rest.len() <= 2 => {
            let every = match rest.first() {
                Some(ms) => Duration::from_millis(parse(ms, "EVERY_MS")?),
                None => Duration::from_secs(1),
            };
            let count: Option<u64> = rest.get(1).map(|c| parse(c, "COUNT")).transpose()?;
            print_lines(text, every, count);
            Ok(ExitCode::SUCCESS)
        }
        ["now"] => {
            // The instant the command began, for lateness measured from inside.
            println!("{}", unix_micros());
            Ok(ExitCode::SUCCESS)
        }
        ["env"] => {
            let vars: BTreeMap<String, String> = std::env::vars().collect();
            for (k, v) in vars {
                println!("{k}={v}");
            }
            sleep_forever()
        }
        ["get", target, rest @ ..] if rest.len() <= 1 => {
            let path = rest.first().copied().unwrap_or("/");
            let addr = resolve(target)?;
            match http_get(addr, path) {
                Ok(body) => {
                    println!("{body}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("testimg: GET {target}{path}: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        ["poll", target, path, every] => {
            let every = Duration::from_millis(parse(every, "EVERY_MS")?);
            let addr = loop {
                match resolve(target) {
                    Ok(a) => break a,
                    Err(e) => {
                        println!("{} fail {e}", unix_ms());
                        thread::sleep(every);
                    }
                }
            };
            eprintln!("testimg: {target} is {addr}");
            loop {
                match http_get(addr, path) {
                    Ok(body) => println!("{} ok {}", unix_ms(), body.trim()),
                    Err(e) => println!("{} fail {e}", unix_ms()),
                }
                thread::sleep(every);
            }
        }
        ["hold", target] => {
            let addr = resolve(target)?;
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            println!("{} connected", unix_ms());
            let mut buf = [0u8; 1024];
            loop {
                match std::io::Read::read(&mut stream, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            println!("{} closed", unix_ms());
            sleep_forever()
        }
        ["rtt", target, n] => {
            let n: usize = parse(n, "N")?;
            let addr = resolve(target)?;
            let mut times = Vec::with_capacity(n);
            for _ in 0..n {
                let start = Instant::now();
                http_get(addr, "/healthz")?;
                times.push(start.elapsed().as_micros());
            }
            times.sort_unstable();
            let at = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
            let mean = times.iter().sum::<u128>() / times.len().max(1) as u128;
            println!("{} {} {mean}", at(0.5), at(0.99));
            Ok(ExitCode::SUCCESS)
        }
        ["sink", port] => {
            let listener = TcpListener::bind(("0.0.0.0", parse::<u16>(port, "PORT")?))
                .map_err(|e| format!("cannot bind port {port}: {e}"))?;
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                thread::spawn(move || {
                    let n = std::io::copy(&mut stream, &mut std::io::sink()).unwrap_or(0);
                    let _ = writeln!(stream, "{n}");
                });
            }
            Ok(ExitCode::SUCCESS)
        }
        ["blast", target, mib] => {
            use std::io::Read;
            let mib: usize = parse(mib, "MIB")?;
            let addr = resolve(target)?;
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .map_err(|e| format!("connect {addr}: {e}"))?;
            let chunk = vec![7u8; 1 << 20];
            let start = Instant::now();
            for _ in 0..mib {
                stream.write_all(&chunk).map_err(|e| format!("send: {e}"))?;
            }
            stream
                .shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            let mut answer = String::new();
            stream
                .read_to_string(&mut answer)
                .map_err(|e| format!("read: {e}"))?;
            let secs = start.elapsed().as_secs_f64();
            if answer.trim() != ((mib as u64) << 20).to_string() {
                return Err(format!("the sink counted {answer:?}"));
            }
            println!("{:.1}", mib as f64 / secs);
            Ok(ExitCode::SUCCESS)
        }
        ["touch", path] => std::fs::write(path, b"")
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| format!("touch {path}: {e}")),
        ["rm", path] => std::fs::remove_file(path)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| format!("rm {path}: {e}")),
        ["exists", path] => Ok(if std::path::Path::new(path).exists() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }),
        ["write", path, text] => std::fs::write(path, text)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| format!("write {path}: {e}")),
        // stdin to stdout until its end (`bramblectl exec -i`).
        ["echo-stdin"] => {
            std::io::copy(&mut std::io::stdin().lock(), &mut std::io::stdout().lock())
                .map(|_| ExitCode::SUCCESS)
                .map_err(|e| format!("echo-stdin: {e}"))
        }
        // Whether stdin and stdout are terminals (`bramblectl exec -t`).
        ["isatty"] => {
            use std::io::IsTerminal;
            println!(
                "stdin {} stdout {}",
                if std::io::stdin().is_terminal() {
                    "tty"
                } else {
                    "pipe"
                },
                if std::io::stdout().is_terminal() {
                    "tty"
                } else {
                    "pipe"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        ["cat", path] => {
            let bytes = std::fs::read(path).map_err(|e| format!("cat {path}: {e}"))?;
            std::io::stdout()
                .write_all(&bytes)
                .map_err(|e| format!("cat {path}: {e}"))?;
            Ok(ExitCode::SUCCESS)
        }
        ["copy", from, to] => {
            // Through a temporary file and a rename, as a wallet's backup command does:
            // the copy is whole or absent.
            let tmp = format!("{to}.part");
            std::fs::copy(from, &tmp)
                .and_then(|_| std::fs::rename(&tmp, to))
                .map(|()| ExitCode::SUCCESS)
                .map_err(|e| format!("copy {from} {to}: {e}"))
        }
        ["fill", path, mib] => {
            let mib: usize = parse(mib, "MIB")?;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut f = std::fs::File::create(path).map_err(|e| format!("fill {path}: {e}"))?;
            let mut block = vec![0u8; 1 << 20];
            for _ in 0..mib {
                for b in block.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                f.write_all(&block)
                    .map_err(|e| format!("fill {path}: {e}"))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ["churn", path, kib, pause_ms] => {
            // Rewrites PATH in place, each version KIB KiB of one byte value (1, 2, …),
            // in 4 KiB writes, pausing PAUSE_MS between versions: a copy that mixes two
            // values was read while it changed.
            let kib: usize = parse(kib, "KIB")?;
            let pause = Duration::from_millis(parse(pause_ms, "PAUSE_MS")?);
            let mut v: u8 = 1;
            loop {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(|e| format!("churn {path}: {e}"))?;
                for _ in 0..kib / 4 {
                    f.write_all(&[v; 4096])
                        .map_err(|e| format!("churn {path}: {e}"))?;
                }
                drop(f);
                v = if v == 255 { 1 } else { v + 1 };
                thread::sleep(pause);
            }
        }
        [] => Err("no subcommand".to_string()),
        _ => Err(format!("unknown or malformed command {args:?}")),
    }
}

/// The first address `HOST:PORT` resolves to (through /etc/hosts and the container's
/// resolver).
fn resolve(target: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    target
        .to_socket_addrs()
        .map_err(|e| format!("resolve {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("resolve {target}: no address"))
}

/// GET `path` on a new connection; the body of a 200 answer.
fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String, String> {
    use std::io::Read;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not HTTP: {answer:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or_default().to_string());
    }
    Ok(body.to_string())
}

fn unix_micros() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or_default()
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
}

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("invalid {what} {s:?}"))
}

fn secs_arg(s: &str) -> Result<Duration, String> {
    let secs: f64 = parse(s, "SECS")?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid SECS {s:?}"))
}

fn sleep_forever() -> ! {
    loop {
        thread::park();
    }
}

fn print_lines(text: &str, every: Duration, count: Option<u64>) {
    let mut n: u64 = 0;
    loop {
        n += 1;
        // stdout is line buffered, so each line reaches Docker's log as it is written.
        println!("{text} {n}");
        if count.is_some_and(|c| n >= c) {
            return;
        }
        thread::sleep(every);
    }
}

fn eat(mib: usize) {
    const MIB: usize = 1 << 20;
    eprintln!("testimg: eating {mib} MiB");
    let mut chunks: Vec<Vec<u8>> = Vec::with_capacity(mib);
    for _ in 0..mib {
        // Writing every page makes the kernel back it with real memory (and charge the
        // cgroup), which an untouched allocation would not.
        let mut chunk = vec![0u8; MIB];
        for page in chunk.iter_mut().step_by(4096) {
            *page = 1;
        }
        chunks.push(std::hint::black_box(chunk));
    }
    eprintln!("testimg: ate {mib} MiB");
    // Leaked on purpose: the memory must stay in use until the process is killed.
    std::mem::forget(chunks);
}

/// Serves HTTP on `port`; with `hang_after`, stops answering after that long.
fn serve(port: u16, text: &str, hang_after: Option<Duration>) -> Result<ExitCode, String> {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| format!("cannot bind port {port}: {e}"))?;
    eprintln!("testimg: serving on port {port}");
    serve_on(listener, text, hang_after);
    Ok(ExitCode::SUCCESS)
}

fn serve_on(listener: TcpListener, text: &str, hang_after: Option<Duration>) {
    let text: Arc<str> = Arc::from(text);
    let hang_at = hang_after.map(|d| Instant::now() + d);
    let mut hung: Vec<TcpStream> = Vec::new();
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        if hang_at.is_some_and(|at| Instant::now() >= at) {
            // Keep the connection open and unanswered, as a wedged daemon would.
            if hung.is_empty() {
                eprintln!("testimg: hanging");
            }
            hung.push(stream);
            continue;
        }
        let text = Arc::clone(&text);
        thread::spawn(move || {
            if let Err(e) = answer(stream, &text) {
                eprintln!("testimg: connection error: {e}");
            }
        });
    }
}

/// Answers one request (and closes the connection: no keep-alive, which is enough for
/// probes and tests).
fn answer(stream: TcpStream, text: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers; a request body is not expected.
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let (status, body) = match (method, path) {
        ("GET", "/") => ("200 OK", text.to_string()),
        ("GET", "/healthz") => ("200 OK", "ok".to_string()),
        ("GET", p) if p.starts_with("/env/") => match std::env::var(&p["/env/".len()..]) {
            Ok(v) => ("200 OK", v),
            Err(_) => ("404 Not Found", "not set".to_string()),
        },
        ("GET", _) => ("404 Not Found", "not found".to_string()),
        _ => ("405 Method Not Allowed", "only GET".to_string()),
    };
    let mut stream = reader.into_inner();
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Serves on an ephemeral loopback port in a background thread.
    fn spawn_server(text: &'static str, hang_after: Option<Duration>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        thread::spawn(move || serve_on(listener, text, hang_after));
        port
    }

    fn get(port: u16, path: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    #[test]
    fn serves_text_health_and_environment() {
        let port = spawn_server("hi there", None);
        let root = get(port, "/").expect("GET /");
        assert!(root.starts_with("HTTP/1.1 200 OK\r\n"), "{root}");
        assert!(root.ends_with("\r\n\r\nhi there"), "{root}");
        assert!(get(port, "/healthz")
            .expect("healthz")
            .ends_with("\r\n\r\nok"));
        let path = get(port, "/env/PATH").expect("env");
        assert!(path.starts_with("HTTP/1.1 200"), "{path}");
        let unset = get(port, "/env/TESTIMG_SURELY_UNSET").expect("env");
        assert!(unset.starts_with("HTTP/1.1 404"), "{unset}");
        assert!(get(port, "/nope").expect("404").starts_with("HTTP/1.1 404"));
    }

    #[test]
    fn hang_stops_answering_but_keeps_accepting() {
        let port = spawn_server("x", Some(Duration::ZERO));
        let err = get(port, "/healthz").expect_err("no answer");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_arguments_are_refused() {
        for args in [
            &[][..],
            &["fly"],
            &["exit", "x"],
            &["exit", "300"],
            &["sleep", "-1"],
            &["serve"],
            &["eat", "lots"],
            &["eat", "1", "soon"],
            &["eat", "1", "1", "1"],
            &["print", "a", "b"],
        ] {
            assert!(run(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn exit_and_print_run_to_completion() {
        assert!(run(&["exit", "0"]).is_ok());
        assert!(run(&["print", "t", "0", "2"]).is_ok());
        assert!(run(&["sleep", "0.01"]).is_ok());
    }
}
