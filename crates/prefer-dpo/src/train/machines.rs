//! Several machines (processes) training one run: each runs its replicas, and the machines sum
//! their replicas' values over TCP through machine 0 — accelerate's `num_machines`,
//! `machine_rank`, `main_process_ip` and `main_process_port`.
//!
//! Burn 0.21's multi-node collective (`burn-collective` with a global orchestrator) does not
//! complete an all-reduce between two processes on one machine: with its ring strategy one node
//! gets the first result and the other waits for ever; with the tree and centralised ones neither
//! returns (and its sync step never clears the peers it has seen, so a second all-reduce could not
//! finish either). The exchange between machines is therefore this small star: every machine
//! sends its sum to machine 0, which adds them in machine order and sends the total back. Within
//! a machine the replicas still meet in Burn's collective engine.
//!
//! A machine that stops (an error, or a killed process) closes its connections; the others' next
//! exchange fails with a message naming it, and they stop too.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    sync::Mutex,
    time::{Duration, Instant},
};

use super::TrainError;

/// Where a machine stands in a run over several machines (accelerate's names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machines {
    /// Machines in the run.
    pub num_machines: usize,
    /// This machine's rank, from 0 (machine 0 writes the logs and checkpoints).
    pub machine_rank: usize,
    /// Machine 0's address, as the others reach it.
    pub main_process_ip: String,
    /// The port machine 0 listens on.
    pub main_process_port: u16,
    /// How long to wait for the other machines to join.
    pub join_timeout: Duration,
}

/// "PRF1": what the first message of a connection starts with.
const HELLO: u32 = 0x5052_4631;

/// The connections of one machine: machine 0 holds one to every other machine (in machine
/// order); the others hold one to machine 0.
#[derive(Debug)]
pub struct Network {
    machines: Machines,
    /// The global rank of this machine's first replica, named in errors.
    rank: usize,
    links: Mutex<Vec<(usize, TcpStream)>>,
}

impl Network {
    /// Joins the run: machine 0 listens and waits for every other machine; the others connect to
    /// it (retrying until `join_timeout`, as machine 0 may start later). Every machine must run
    /// `local_replicas` replicas.
    pub fn join(machines: &Machines, local_replicas: usize) -> Result<Self, TrainError> {
        let m = machines;
        let rank = m.machine_rank * local_replicas;
        if m.machine_rank >= m.num_machines {
            return Err(network_error(
                rank,
                format!(
                    "machine_rank {} is not below num_machines {}",
                    m.machine_rank, m.num_machines
                ),
            ));
        }
        let links = match m.machine_rank {
            0 => accept_machines(m, local_replicas)?,
            _ => vec![(0, connect_to_main(m, local_replicas)?)],
        };
        Ok(Self {
            machines: m.clone(),
            rank,
            links: Mutex::new(links),
        })
    }

    /// This machine's rank.
    pub fn machine_rank(&self) -> usize {
        self.machines.machine_rank
    }

    /// Machines in the run.
    pub fn num_machines(&self) -> usize {
        self.machines.num_machines
    }

    /// The sum over the machines of `values` (the same length on every machine), added in
    /// machine order on machine 0.
    pub fn sum(&self, values: Vec<f32>) -> Result<Vec<f32>, TrainError> {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let stopped = |machine: usize, e: &std::io::Error| stopped(self.rank, machine, e);
        if self.machines.machine_rank != 0 {
            let (_, main) = &mut links[0];
            send(main, &values).map_err(|e| stopped(0, &e))?;
            return receive(main).map_err(|e| stopped(0, &e));
        }
        let mut total = values;
        for (machine, link) in links.iter_mut() {
            let theirs = receive(link).map_err(|e| stopped(*machine, &e))?;
            if theirs.len() != total.len() {
                return Err(network_error(
                    self.rank,
                    format!(
                        "machine {machine} sent {} values where machine 0 has {}: the machines do not \
                     run the same training (check that they have the same config and data)",
                        theirs.len(),
                        total.len()
                    ),
                ));
            }
            total.iter_mut().zip(theirs).for_each(|(t, v)| *t += v);
        }
        for (machine, link) in links.iter_mut() {
            send(link, &total).map_err(|e| stopped(*machine, &e))?;
        }
        Ok(total)
    }

    /// Closes every connection, so the other machines' pending exchanges fail now.
    pub fn shut_down(&self) {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for (_, link) in links.iter() {
            let _ = link.shutdown(Shutdown::Both);
        }
    }
}

fn network_error(rank: usize, message: String) -> TrainError {
    TrainError::Collective { rank, message }
}

fn stopped(rank: usize, machine: usize, e: &std::io::Error) -> TrainError {
    network_error(
        rank,
        format!(
            "machine {machine} stopped (its connection failed: {e}); {}",
            super::data_parallel::STOPPED
        ),
    )
}

/// Machine 0: waits for the other machines' hellos, answers each (an empty answer admits it, else
/// the reason it is refused, which that machine reports), and orders the links.
fn accept_machines(m: &Machines, local: usize) -> Result<Vec<(usize, TcpStream)>, TrainError> {
    let fail = |message: String| network_error(0, message);
    let address = format!("0.0.0.0:{}", m.main_process_port);
    let listener = TcpListener::bind(&address)
        .map_err(|e| fail(format!("machine 0 cannot listen on {address}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(e.to_string()))?;
    let deadline = Instant::now() + m.join_timeout;
    let mut links: Vec<(usize, TcpStream)> = Vec::new();
    while links.len() + 1 < m.num_machines {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(|e| fail(e.to_string()))?;
                // Something else that knocked on the port (a scanner, a health check) is not a
                // machine of the run: it is dropped and the wait goes on.
                let Ok((machine, replicas)) = read_hello(&mut stream) else {
                    continue;
                };
                let refusal = if machine == 0 || machine >= m.num_machines {
                    Some(format!(
                        "{peer} joined as machine {machine} of a run of {} machines",
                        m.num_machines
                    ))
                } else if links.iter().any(|(r, _)| *r == machine) {
                    Some(format!(
                        "two machines joined as machine {machine} (the second from {peer})"
                    ))
                } else if replicas != local {
                    Some(format!(
                        "machine {machine} runs {replicas} devices and machine 0 runs {local}: \
                         every machine must run the same number"
                    ))
                } else {
                    None
                };
                let _ = write_text(&mut stream, refusal.as_deref().unwrap_or_default());
                if let Some(refusal) = refusal {
                    return Err(fail(refusal));
                }
                stream.set_nodelay(true).ok();
                links.push((machine, stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(fail(format!(
                        "machine 0 waited {:?} on port {} for {} machines and {} joined",
                        m.join_timeout,
                        m.main_process_port,
                        m.num_machines - 1,
                        links.len()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(fail(format!("machine 0: {e}"))),
        }
    }
    links.sort_by_key(|(machine, _)| *machine);
    Ok(links)
}

/// Another machine: connects to machine 0 (retrying until the deadline), says who it is, and
/// waits to be admitted.
fn connect_to_main(m: &Machines, local: usize) -> Result<TcpStream, TrainError> {
    let rank = m.machine_rank * local;
    let address = format!("{}:{}", m.main_process_ip, m.main_process_port);
    let deadline = Instant::now() + m.join_timeout;
    let mut stream = loop {
        match TcpStream::connect(&address) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(network_error(
                    rank,
                    format!(
                        "machine {} could not reach machine 0 at {address} within {:?}: {e}",
                        m.machine_rank, m.join_timeout
                    ),
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream.set_nodelay(true).ok();
    let mut hello = HELLO.to_le_bytes().to_vec();
    hello.extend((m.machine_rank as u64).to_le_bytes());
    hello.extend((local as u64).to_le_bytes());
    stream.write_all(&hello).map_err(|e| stopped(rank, 0, &e))?;
    let answer = read_text(&mut stream).map_err(|e| stopped(rank, 0, &e))?;
    if !answer.is_empty() {
        return Err(network_error(
            rank,
            format!("machine 0 refused this machine: {answer}"),
        ));
    }
    Ok(stream)
}

/// A short text: its length, then its bytes.
fn write_text(stream: &mut TcpStream, text: &str) -> std::io::Result<()> {
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text.as_bytes());
    stream.write_all(&bytes)
}

fn read_text(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    let mut bytes = vec![0u8; u64::from_le_bytes(len).min(1 << 16) as usize];
    stream.read_exact(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn read_hello(stream: &mut TcpStream) -> std::io::Result<(usize, usize)> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 20];
    stream.read_exact(&mut buf)?;
    stream.set_read_timeout(None)?;
    if u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) != HELLO {
        return Err(std::io::Error::other("wrong greeting"));
    }
    let word = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8 bytes")) as usize;
    Ok((word(4), word(12)))
}

/// One message: the count, then the values (little-endian).
fn send(stream: &mut TcpStream, values: &[f32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(8 + 4 * values.len());
    bytes.extend((values.len() as u64).to_le_bytes());
    for v in values {
        bytes.extend(v.to_le_bytes());
    }
    stream.write_all(&bytes)
}

fn receive(stream: &mut TcpStream) -> std::io::Result<Vec<f32>> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len) as usize;
    let mut bytes = vec![0u8; 4 * n];
    stream.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machines(rank: usize, port: u16) -> Machines {
        Machines {
            num_machines: 3,
            machine_rank: rank,
            main_process_ip: "127.0.0.1".into(),
            main_process_port: port,
            join_timeout: Duration::from_secs(20),
        }
    }

    /// Three machines (threads here) sum their values in machine order, twice; then one stops
    /// and the others' next exchange names it.
    #[test]
    fn machines_sum_through_machine_0_and_a_stopped_one_is_named() {
        let port = 29_000 + (std::process::id() % 2000) as u16;
        let results: Vec<_> = std::thread::scope(|s| {
            // A stray connection that says nothing prefer-like is ignored by machine 0.
            s.spawn(move || {
                for _ in 0..100 {
                    if let Ok(mut stray) = TcpStream::connect(("127.0.0.1", port)) {
                        let _ = stray.write_all(b"GET / HTTP/1.1\r\n\r\n....");
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    s.spawn(move || {
                        let net = Network::join(&machines(rank, port), 1).unwrap();
                        let first = net.sum(vec![rank as f32, 1.0]).unwrap();
                        let second = net.sum(vec![0.5; 3]).unwrap();
                        if rank == 2 {
                            net.shut_down();
                            return (first, second, None);
                        }
                        let third = net.sum(vec![1.0]).map_err(|e| e.to_string());
                        (first, second, Some(third))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (first, second, third) in &results {
            assert_eq!(first, &vec![3.0, 3.0]);
            assert_eq!(second, &vec![1.5; 3]);
            if let Some(third) = third {
                let err = third.as_ref().unwrap_err();
                assert!(
                    err.contains("machine 2 stopped") || err.contains("machine 0 stopped"),
                    "{err}"
                );
            }
        }
    }

    /// A machine with another number of devices is refused at the door, and says why.
    #[test]
    fn machine_0_refuses_a_machine_with_another_device_count() {
        let port = 27_000 + (std::process::id() % 2000) as u16;
        let two = |rank| Machines {
            num_machines: 2,
            ..machines(rank, port)
        };
        let (main, other) = std::thread::scope(|s| {
            let main = s.spawn(|| Network::join(&two(0), 1).map(|_| ()));
            let other = s.spawn(|| Network::join(&two(1), 2).map(|_| ()));
            (main.join().unwrap(), other.join().unwrap())
        });
        let (main, other) = (
            main.unwrap_err().to_string(),
            other.unwrap_err().to_string(),
        );
        assert!(
            main.contains("machine 1 runs 2 devices and machine 0 runs 1"),
            "{main}"
        );
        assert!(
            other.starts_with("replica 2: machine 0 refused this machine: machine 1 runs 2"),
            "{other}"
        );
    }
}
