//! The response body on its way back to the agent: every form of an
//! injected value the upstream echoes (a debug endpoint, an error message, a
//! redirect URL) is replaced with the placeholder, also across chunk
//! boundaries; the bytes are counted and the audit line is written when the
//! body ends or the agent goes away.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::audit::ProxyUse;
use super::inject::{find, replace_all};

pub struct ScrubBody<B> {
    inner: B,
    /// (needle, replacement), longest needle first.
    scrub: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes held back because a needle may continue in the next chunk.
    carry: Vec<u8>,
    hold: usize,
    ended: bool,
    record: Option<ProxyUse>,
}

impl<B> ScrubBody<B> {
    pub fn new(inner: B, scrub: Vec<(Vec<u8>, Vec<u8>)>, record: ProxyUse) -> Self {
        let hold = scrub
            .iter()
            .map(|(n, _)| n.len().saturating_sub(1))
            .max()
            .unwrap_or(0);
        ScrubBody {
            inner,
            scrub,
            carry: Vec::new(),
            hold,
            ended: false,
            record: Some(record),
        }
    }

    fn mask(&mut self) {
        for (needle, with) in &self.scrub {
            if find(&self.carry, needle).is_some() {
                self.carry = replace_all(&self.carry, needle, with);
            }
        }
    }

    fn count(&mut self, n: usize) {
        if let Some(r) = self.record.as_mut() {
            r.response_bytes += n as u64;
        }
    }
}

impl<B> Drop for ScrubBody<B> {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            r.emit();
        }
    }
}

impl<B> Body for ScrubBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                if this.carry.is_empty() {
                    if let Some(r) = this.record.take() {
                        r.emit();
                    }
                    return Poll::Ready(None);
                }
                this.mask();
                let rest = Bytes::from(std::mem::take(&mut this.carry));
                this.count(rest.len());
                return Poll::Ready(Some(Ok(Frame::data(rest))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.ended = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if this.scrub.is_empty() {
                            this.count(data.len());
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        this.carry.extend_from_slice(&data);
                        this.mask();
                        let ready = this.carry.len().saturating_sub(this.hold);
                        if ready == 0 {
                            continue;
                        }
                        let out: Vec<u8> = this.carry.drain(..ready).collect();
                        this.count(out.len());
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                    // Trailers pass unchanged; upstreams do not echo
                    // request headers there.
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.carry.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        // Masking changes lengths: no exact hint.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, StreamBody};

    #[tokio::test]
    async fn a_value_split_across_chunks_is_masked() {
        let chunks = ["echo: sec", "ret and se", "cret", "!"];
        let stream = futures::stream::iter(
            chunks
                .iter()
                .map(|c| Ok::<_, std::io::Error>(Frame::data(Bytes::from(*c)))),
        );
        let body = ScrubBody::new(
            StreamBody::new(stream),
            vec![(b"secret".to_vec(), b"PH".to_vec())],
            ProxyUse::default(),
        );
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], b"echo: PH and PH!");
    }
}
