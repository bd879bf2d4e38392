//! The coordinator's side of the worker processes: spawn (re-executing this binary with the
//! hidden `__worker` subcommand), send command lines, wait for answer lines.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::hist::Hist;

pub struct Pool {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    pub pids: Vec<u32>,
    rx: mpsc::Receiver<(usize, Option<String>)>,
    mail: Vec<VecDeque<String>>,
    gone: Vec<bool>,
}

impl Pool {
    /// Starts one worker per argument list.
    pub fn spawn(arg_lists: Vec<Vec<String>>) -> Result<Pool> {
        let exe = std::env::current_exe().context("current_exe")?;
        let (tx, rx) = mpsc::channel();
        let mut pool = Pool { children: Vec::new(), stdins: Vec::new(), pids: Vec::new(), rx, mail: Vec::new(), gone: Vec::new() };
        for (index, args) in arg_lists.into_iter().enumerate() {
            let mut child = Command::new(&exe)
                .arg("__worker")
                .args(&args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("spawning a worker")?;
            let stdout = child.stdout.take().expect("piped");
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    match line {
                        Ok(line) => {
                            if tx.send((index, Some(line))).is_err() {
                                return;
                            }
                        }
                        Err(_) => break,
                    }
                }
                let _ = tx.send((index, None));
            });
            pool.stdins.push(child.stdin.take().expect("piped"));
            pool.pids.push(child.id());
            pool.children.push(child);
            pool.mail.push(VecDeque::new());
            pool.gone.push(false);
        }
        Ok(pool)
    }

    pub fn len(&self) -> usize {
        self.children.len()
    }

    pub fn send(&mut self, worker: usize, line: &str) -> Result<()> {
        writeln!(self.stdins[worker], "{line}").and_then(|_| self.stdins[worker].flush()).with_context(|| format!("worker {worker} is gone"))
    }

    pub fn send_all(&mut self, line: &str) -> Result<()> {
        for w in 0..self.len() {
            self.send(w, line)?;
        }
        Ok(())
    }

    /// The next line from `worker` starting with `prefix` (other lines stay queued).
    pub fn wait(&mut self, worker: usize, prefix: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.mail[worker].iter().position(|l| l.starts_with(prefix)) {
                return Ok(self.mail[worker].remove(pos).expect("position exists"));
            }
            if self.gone[worker] {
                bail!("worker {worker} exited while waiting for {prefix:?}");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out waiting for {prefix:?} from worker {worker}");
            }
            match self.rx.recv_timeout(left) {
                Ok((w, Some(line))) => {
                    if line.starts_with("error") {
                        eprintln!("worker {w}: {line}");
                    }
                    self.mail[w].push_back(line)
                }
                Ok((w, None)) => self.gone[w] = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("all workers gone"),
            }
        }
    }

    /// Sends `line` to the given workers and collects the answer starting with `prefix` from each.
    pub fn ask(&mut self, workers: &[usize], line: &str, prefix: &str, timeout: Duration) -> Result<Vec<String>> {
        for &w in workers {
            self.send(w, line)?;
        }
        workers.iter().map(|&w| self.wait(w, prefix, timeout)).collect()
    }

    pub fn quit(mut self) {
        let _ = self.send_all("quit");
        let deadline = Instant::now() + Duration::from_secs(10);
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// `key=value` words of an answer line.
pub fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace().filter_map(|w| w.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub fn field_u64(map: &HashMap<String, String>, key: &str) -> Result<u64> {
    map.get(key).ok_or_else(|| anyhow!("answer lacks {key}"))?.parse().map_err(|_| anyhow!("bad {key}"))
}

pub fn field_hist(map: &HashMap<String, String>, key: &str) -> Result<Hist> {
    Hist::decode(map.get(key).ok_or_else(|| anyhow!("answer lacks {key}"))?).ok_or_else(|| anyhow!("bad histogram {key}"))
}
