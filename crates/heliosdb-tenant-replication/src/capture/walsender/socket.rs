//! The walsender's socket, able to leave the runtime's poller while a paced
//! reader waits (see `PACE` in the parent module).
//!
//! A socket registered with the poller wakes its thread for every segment
//! that arrives, whether anyone reads it or not, and the walsender writes
//! each message in a segment of its own. Parked, the socket is out of the
//! poller: the bytes gather in the kernel, and the next read or write
//! registers it again (an edge-triggered registration reports the bytes
//! already there at once).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A tokio stream that can leave the poller (as its std form) and come back.
pub trait Registered: AsyncRead + AsyncWrite + Unpin + Send + Sized {
    type Std: Send + Unpin;
    fn deregister(self) -> io::Result<Self::Std>;
    fn register(std: Self::Std) -> io::Result<Self>;
}

impl Registered for tokio::net::TcpStream {
    type Std = std::net::TcpStream;
    fn deregister(self) -> io::Result<Self::Std> {
        self.into_std()
    }
    fn register(std: Self::Std) -> io::Result<Self> {
        Self::from_std(std)
    }
}

impl Registered for tokio::net::UnixStream {
    type Std = std::os::unix::net::UnixStream;
    fn deregister(self) -> io::Result<Self::Std> {
        self.into_std()
    }
    fn register(std: Self::Std) -> io::Result<Self> {
        Self::from_std(std)
    }
}

enum State<S: Registered> {
    Live(S),
    Parked(S::Std),
    /// Deregistering or registering failed; the socket is gone.
    Lost,
}

/// A stream that [`Parkable::park`] takes out of the poller until its next
/// read or write.
pub struct Parkable<S: Registered> {
    state: State<S>,
}

impl<S: Registered> Parkable<S> {
    pub fn new(stream: S) -> Self {
        Self {
            state: State::Live(stream),
        }
    }

    /// Leave the poller until the next read or write.
    pub fn park(&mut self) -> io::Result<()> {
        if let State::Live(_) = self.state {
            if let State::Live(s) = std::mem::replace(&mut self.state, State::Lost) {
                self.state = State::Parked(s.deregister()?);
            }
        }
        Ok(())
    }

    /// The registered stream, registering a parked one again.
    fn live(&mut self) -> io::Result<Pin<&mut S>> {
        if let State::Parked(_) = self.state {
            if let State::Parked(std) = std::mem::replace(&mut self.state, State::Lost) {
                self.state = State::Live(S::register(std)?);
            }
        }
        match &mut self.state {
            State::Live(s) => Ok(Pin::new(s)),
            _ => Err(io::Error::other(
                "the socket was lost while out of the runtime's poller",
            )),
        }
    }
}

impl<S: Registered> AsyncRead for Parkable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().live() {
            Ok(s) => s.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: Registered> AsyncWrite for Parkable<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().live() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().live() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().live() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes written while the reader is parked are all read after it,
    /// in order, and writes work from the parked state too.
    #[tokio::test]
    async fn parked_sockets_lose_nothing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (client, server) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let mut reader = Parkable::new(client.expect("connect"));
        let (mut writer, _) = server.expect("accept");
        let mut expected = Vec::new();
        for round in 0u8..20 {
            reader.park().expect("park");
            reader.park().expect("parking twice is harmless");
            let chunk: Vec<u8> = (0..1000u32).map(|i| (i as u8) ^ round).collect();
            writer.write_all(&chunk).await.expect("write");
            expected.extend_from_slice(&chunk);
        }
        reader.park().expect("park");
        reader.write_all(b"ping").await.expect("write while parked");
        let mut ping = [0u8; 4];
        writer.read_exact(&mut ping).await.expect("read ping");
        assert_eq!(&ping, b"ping");
        let mut got = vec![0u8; expected.len()];
        reader.park().expect("park");
        reader
            .read_exact(&mut got)
            .await
            .expect("read after parking");
        assert_eq!(got, expected);
        drop(writer);
        reader.park().expect("park");
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).await.expect("end of stream");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn unix_sockets_park_too() {
        let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
        let mut a = Parkable::new(a);
        a.park().expect("park");
        b.write_all(b"hello").await.expect("write");
        let mut got = [0u8; 5];
        a.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello");
    }
}
