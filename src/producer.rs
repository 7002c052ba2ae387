//! Folding every planned block ahead of the writer. The chunks of output channels of all blocks
//! form one queue, in the order the output needs them; worker threads fold the next chunks, up
//! to a few per worker beyond the last one written, and the writer takes them in order. There is
//! no barrier between chunks or blocks: while the writer writes, the workers fold on, into the
//! next block too.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::constant::Constants;
use crate::error::{Error, Result};
use crate::fold::{self, FoldError};
use crate::plan::Plan;
use crate::recipe::scaled::Scaled;
use crate::recipe::{Rounding, Rows};
use crate::tensor::{self, FloatType};

/// Weights folded at a time (whole output channels, at least one): 1 MB as float32.
pub(crate) const CHUNK_ELEMENTS: usize = 1 << 18;

/// Chunks folded ahead of the writer, per worker.
pub(crate) const AHEAD_PER_WORKER: usize = 4;

/// Bytes of one block's weights written between two releases of the input pages they were read
/// from (so that even one huge block stays small in memory).
const RELEASE_BYTES: usize = 64 << 20;

/// One chunk of one block: output channels `rows` of the block at `position` in the order.
struct Task {
    position: usize,
    rows: Range<usize>,
}

/// A block's kernel, built by the first worker that needs it and dropped once it is written.
enum Slot {
    Empty,
    Ready(Arc<dyn Rows>),
    /// The fold failed (the error, until the writer takes it).
    Failed(Option<Error>),
    Done,
}

/// What workers and writer share.
struct State {
    /// The next task to fold.
    claimed: usize,
    /// Tasks the writer has taken.
    written: usize,
    /// Tasks `written..`: folded (`Some`; `None` inside when the block's fold failed) or not yet.
    done: VecDeque<Option<Option<Chunk>>>,
    /// Position in the order of the next block the writer asks for.
    next_block: usize,
    stop: bool,
}

/// The folding of `plans` for one output (see the module docs).
pub struct Producer<'a, 'm> {
    index: &'a Constants<'a, 'm>,
    plans: &'a [Plan<'a>],
    /// Indices into `plans`, in the order the writer asks for them.
    order: Vec<usize>,
    tasks: Vec<Task>,
    /// Each position's tasks.
    spans: Vec<Range<usize>>,
    slots: Vec<Mutex<Slot>>,
    /// Tasks folded ahead of the writer at most.
    ahead: usize,
    state: Mutex<State>,
    /// Signalled when the writer takes a chunk (or stops): workers may fold further.
    room: Condvar,
    /// Signalled when a chunk is folded: the writer may take it.
    ready: Condvar,
    /// Encoded chunks' buffers, back from the writer: fresh ones would be zeroed again.
    buffers: Mutex<Vec<Vec<u8>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Stops the workers when the writer is done, however it ends.
struct StopOnDrop<'p, 'a, 'm>(&'p Producer<'a, 'm>);

impl Drop for StopOnDrop<'_, '_, '_> {
    fn drop(&mut self) {
        lock(&self.0.state).stop = true;
        self.0.room.notify_all();
    }
}

impl<'a, 'm> Producer<'a, 'm> {
    /// Folds `plans` in `order` on [`workers`] threads while `writer` takes their tensors with
    /// [`Producer::write_block`], in that order; returns what `writer` returns.
    pub fn run<R>(
        index: &'a Constants<'a, 'm>,
        plans: &'a [Plan<'a>],
        order: Vec<usize>,
        writer: impl FnOnce(&Producer<'a, 'm>) -> R,
    ) -> R {
        Producer::run_with(index, plans, order, workers(), CHUNK_ELEMENTS, writer)
    }

    /// [`Producer::run`] with `workers` threads and chunks of about `chunk` weights.
    fn run_with<R>(
        index: &'a Constants<'a, 'm>,
        plans: &'a [Plan<'a>],
        order: Vec<usize>,
        workers: usize,
        chunk: usize,
        writer: impl FnOnce(&Producer<'a, 'm>) -> R,
    ) -> R {
        let producer = Producer::new(index, plans, order, workers, chunk);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    yield_to_writer();
                    producer.work()
                });
            }
            let _stop = StopOnDrop(&producer);
            writer(&producer)
        })
    }

    fn new(
        index: &'a Constants<'a, 'm>,
        plans: &'a [Plan<'a>],
        order: Vec<usize>,
        workers: usize,
        chunk: usize,
    ) -> Self {
        let mut tasks = Vec::new();
        let mut spans = Vec::new();
        for (position, &p) in order.iter().enumerate() {
            let start = tasks.len();
            if let Some(plan) = plans.get(p) {
                let rows = rows_per_chunk(plan, chunk);
                let channels = plan.weight_dims()[0];
                tasks.extend((0..channels).step_by(rows).map(|first| Task {
                    position,
                    rows: first..(first + rows).min(channels),
                }));
            }
            spans.push(start..tasks.len());
        }
        Producer {
            index,
            plans,
            slots: order.iter().map(|_| Mutex::new(Slot::Empty)).collect(),
            order,
            tasks,
            spans,
            ahead: AHEAD_PER_WORKER * workers,
            state: Mutex::new(State {
                claimed: 0,
                written: 0,
                done: VecDeque::new(),
                next_block: 0,
                stop: false,
            }),
            room: Condvar::new(),
            ready: Condvar::new(),
            buffers: Mutex::new(Vec::new()),
        }
    }

    /// A worker: folds the next task while there is room ahead of the writer.
    fn work(&self) {
        loop {
            let t = {
                let mut state = lock(&self.state);
                loop {
                    if state.stop || state.claimed >= self.tasks.len() {
                        return;
                    }
                    if state.claimed < state.written + self.ahead {
                        break;
                    }
                    state = self
                        .room
                        .wait(state)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                state.claimed += 1;
                state.claimed - 1
            };
            let task = &self.tasks[t];
            let dtype = self.plans[self.order[task.position]].dtype();
            let buffer = lock(&self.buffers).pop().unwrap_or_default();
            // A panic must not leave the writer waiting: it fails the block instead.
            let chunk = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.recipe(task.position)
                    .map(|recipe| Chunk::encode(recipe.as_ref(), task.rows.clone(), dtype, buffer))
            }))
            .ok()
            .flatten();
            let mut state = lock(&self.state);
            let at = t - state.written;
            if state.done.len() <= at {
                state.done.resize_with(at + 1, || None);
            }
            state.done[at] = Some(chunk);
            self.ready.notify_one();
        }
    }

    /// The recipe of the block at `position`, built on first use; `None` when its fold failed.
    fn recipe(&self, position: usize) -> Option<Arc<dyn Rows>> {
        let mut slot = lock(&self.slots[position]);
        if matches!(*slot, Slot::Empty) {
            *slot = match self.build(self.plans[self.order[position]]) {
                Ok(recipe) => Slot::Ready(recipe),
                Err(e) => Slot::Failed(Some(e)),
            };
        }
        match &*slot {
            Slot::Ready(recipe) => Some(recipe.clone()),
            _ => None,
        }
    }

    fn build(&self, plan: Plan) -> Result<Arc<dyn Rows>> {
        let failed = |reason: String| Error::Graph(format!("block '{}' {reason}", plan.name()));
        let plan = match plan {
            Plan::Linear(plan) => return Ok(Arc::new(Scaled::build(self.index, plan)?)),
            Plan::Conv(plan) => plan,
        };
        match fold::recipe(
            self.index,
            &plan.block,
            plan.options,
            plan.spatial.as_deref(),
        ) {
            Ok(r) if r.layout.weight_dims() == plan.layout.weight_dims() => Ok(Arc::new(r)),
            Ok(_) => Err(failed("folded to another shape than planned".into())),
            Err(FoldError::Invalid(e)) => Err(e),
            Err(FoldError::Skip(reason) | FoldError::Training(reason)) => {
                Err(failed(format!("no longer folds: {reason}")))
            }
        }
    }

    /// Why the block at `position` failed.
    fn failure(&self, position: usize) -> Error {
        let plan = &self.plans[self.order[position]];
        match &mut *lock(&self.slots[position]) {
            Slot::Failed(e) => e.take(),
            _ => None,
        }
        .unwrap_or_else(|| Error::Graph(format!("block '{}' could not be folded", plan.name())))
    }

    /// Waits for task `t` (the next one to write) and takes it.
    fn take(&self, t: usize) -> Option<Chunk> {
        let mut state = lock(&self.state);
        debug_assert_eq!(t, state.written);
        loop {
            if let Some(Some(_)) = state.done.front() {
                let chunk = state.done.pop_front().flatten().flatten();
                state.written += 1;
                // Wake the workers once half the room is free (not for every chunk).
                if state.claimed - state.written == self.ahead / 2 {
                    self.room.notify_all();
                }
                return chunk;
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Hands the fused weight of plan `p` (the next in the order) to `write`, in chunks as they
    /// are folded; returns the encoded bias and the written rows `sample` asks for.
    pub fn write_block(
        &self,
        p: usize,
        write: &mut dyn FnMut(&[u8]) -> Result<()>,
        sample: &[usize],
    ) -> Result<Produced> {
        let position = {
            let mut state = lock(&self.state);
            let position = state.next_block;
            if self.order.get(position) != Some(&p) {
                return Err(Error::Graph(format!(
                    "block {p} was asked for out of the planned order"
                )));
            }
            state.next_block += 1;
            position
        };
        let plan = self
            .plans
            .get(p)
            .ok_or_else(|| Error::Graph(format!("block {p} was not planned")))?;
        let dims = plan.weight_dims();
        let dtype = plan.dtype();
        let row_bytes = dims[1..].iter().product::<usize>() * dtype.size();
        let mut sampled_dims = dims.clone();
        sampled_dims[0] = sample.len();
        let mut sampled = vec![0; sample.len() * row_bytes];
        let mut rounding = Rounding::default();
        let (mut unreleased, mut released) = (0, 0);
        for t in self.spans[position].clone() {
            let chunk = self.take(t).ok_or_else(|| self.failure(position))?;
            write(&chunk.encoded)?;
            let rows = sampled.chunks_exact_mut(row_bytes.max(1));
            for (&r, row) in sample.iter().zip(rows) {
                if chunk.rows.contains(&r) {
                    let at = (r - chunk.rows.start) * row_bytes;
                    row.copy_from_slice(&chunk.encoded[at..at + row_bytes]);
                }
            }
            rounding = rounding.combine(chunk.rounding);
            unreleased += chunk.encoded.len();
            if unreleased > RELEASE_BYTES {
                // The input pages of the rows written so far (the workers are past them).
                if let Some(recipe) = self.recipe(position) {
                    let rows = released..chunk.rows.end;
                    recipe
                        .stored_rows(rows)
                        .into_iter()
                        .for_each(|bytes| self.index.model.release(bytes));
                }
                (unreleased, released) = (0, chunk.rows.end);
            }
            lock(&self.buffers).push(chunk.encoded);
        }
        let recipe = self
            .recipe(position)
            .ok_or_else(|| self.failure(position))?;
        *lock(&self.slots[position]) = Slot::Done;
        let mut bias = Vec::new();
        tensor::encode_into(recipe.bias(), dtype, &mut bias);
        let half = matches!(dtype, FloatType::F16 | FloatType::Bf16);
        let rounding = half.then(|| rounding.relative());
        Ok(Produced {
            bias: bias.into(),
            sampled_bytes: sampled,
            sampled_dims,
            dtype,
            rounding,
        })
    }
}

/// What writing a block's fused tensors leaves to check and report.
#[derive(Debug, Clone)]
pub struct Produced {
    /// The encoded bias.
    pub bias: bytes::Bytes,
    /// The written weight rows of the requested output channels, in request order, as written
    /// (decoded by [`Produced::sampled`], off the writer's thread).
    pub sampled_bytes: Vec<u8>,
    /// Their dims (the weight's, with the request's length first) and element type.
    pub sampled_dims: Vec<usize>,
    pub dtype: FloatType,
    /// For half-precision weights: the largest change rounding the f64 fold to that type made,
    /// relative to the largest weight.
    pub rounding: Option<f64>,
}

impl Produced {
    /// The written rows of the requested output channels, decoded.
    pub fn sampled(&self) -> Result<ndarray::ArrayD<f64>> {
        let values = tensor::decode(&self.sampled_bytes, self.dtype);
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&self.sampled_dims), values)
            .map_err(|e| Error::Graph(format!("sampled rows: {e}")))
    }

    /// The bias, decoded.
    pub fn bias(&self) -> Result<ndarray::ArrayD<f64>> {
        let values = tensor::decode(&self.bias, self.dtype);
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&[values.len()]), values)
            .map_err(|e| Error::Graph(format!("bias: {e}")))
    }
}

/// Folds one plan on its own (see [`Producer`] to fold many): hands each chunk of the encoded
/// weight to `write` (so even the largest block never sits in memory whole) and returns the
/// encoded bias and the written rows `sample` asks for.
pub fn fold_block(
    index: &Constants,
    plan: Plan,
    write: &mut dyn FnMut(&[u8]) -> Result<()>,
    sample: &[usize],
) -> Result<Produced> {
    Producer::run(index, &[plan], vec![0], |producer| {
        producer.write_block(0, write, sample)
    })
}

/// Tensors smaller than this keep their pages (see [`release_pages`]).
const RELEASE_AT_LEAST: usize = 1 << 16;

/// Lets go of the input's mapped pages under the data of the tensors a block reads (they stay in
/// the page cache), once it is written and checked.
pub fn release_pages(index: &Constants, plan: Plan) {
    let tensors = plan
        .nodes()
        .into_iter()
        .flat_map(|n| &index.node(n).input)
        .filter_map(|v| index.declared_tensor(v));
    // Small tensors share pages with others and are not worth a call (each one interrupts the
    // other cores to flush their TLBs).
    for t in tensors {
        match tensor::stored(t, &index.model.external) {
            Some(bytes) if bytes.len() >= RELEASE_AT_LEAST => index.model.release(&bytes),
            _ => {}
        }
    }
}

/// Environment variable that sets the number of worker threads (default: one per core).
pub const THREADS_VAR: &str = "ONNX_REPVGG_THREADS";

/// The most worker threads [`THREADS_VAR`] may ask for.
pub const MAX_THREADS: usize = 1024;

/// [`THREADS_VAR`] when it is set and not empty: a whole number from 1 to [`MAX_THREADS`], or
/// [`Error::Environment`] naming the variable. Never ignored: the CLI checks it before any work,
/// and [`crate::memory::check`] before any run writes.
pub fn threads_from_env() -> Result<Option<usize>> {
    let Some(raw) = std::env::var_os(THREADS_VAR) else {
        return Ok(None);
    };
    let value = raw.to_string_lossy();
    let text = value.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match text.parse::<usize>() {
        Ok(n @ 1..=MAX_THREADS) => Ok(Some(n)),
        _ => Err(Error::Environment {
            variable: THREADS_VAR,
            value: value.into_owned(),
            reason: format!(
                "not a number of threads: use a whole number from 1 to {MAX_THREADS}, or leave it unset for one per core"
            ),
        }),
    }
}

/// Worker threads: [`THREADS_VAR`], or one per core (also where the variable is invalid: every
/// run checks it, through [`crate::memory::check`], before it writes anything).
pub fn workers() -> usize {
    threads_from_env()
        .ok()
        .flatten()
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Output channels per chunk of about `chunk` weights of a plan's weight.
fn rows_per_chunk(plan: &Plan, chunk: usize) -> usize {
    let row: usize = plan.weight_dims()[1..].iter().product();
    (chunk / row.max(1)).max(1)
}

/// One chunk of output channels, folded and encoded.
struct Chunk {
    rows: Range<usize>,
    encoded: Vec<u8>,
    rounding: Rounding,
}

thread_local! {
    /// Each worker's row buffers, reused from chunk to chunk.
    static ROWS: std::cell::RefCell<(Vec<f64>, Vec<f64>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

impl Chunk {
    fn encode(recipe: &dyn Rows, rows: Range<usize>, ty: FloatType, mut encoded: Vec<u8>) -> Chunk {
        // A recycled buffer mostly has the length already: no zeroing.
        encoded.resize(rows.len() * recipe.row_len() * ty.size(), 0);
        let rounding = ROWS.with_borrow_mut(|(acc, scratch)| {
            recipe.encode_rows(rows.clone(), ty, &mut encoded, acc, scratch)
        });
        Chunk {
            rows,
            encoded,
            rounding,
        }
    }
}

/// How much lower than the writer workers and checks run (Linux nice levels: a weight of about a
/// third; 0 to 19 are all allowed without privileges).
const NICE: i32 = 5;

/// Lowers the calling thread's scheduling priority by [`NICE`], so that the writer, the thread
/// the run waits for, gets a core whenever it can run and folding takes the time it leaves.
/// (With more runnable threads than cores, equal shares would slow the writer down.)
pub(crate) fn yield_to_writer() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: plain system calls on this thread's own id.
        unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::onnx::Model;
    use crate::plan;

    /// Runs `body` on the sample grouped model's index and plans, on a thread of its own, and
    /// fails the test if it does not finish: a producer that hangs must fail, not stall the run.
    fn finishes<T: Send + 'static>(
        body: impl FnOnce(&Constants, plan::Analysis) -> T + Send + 'static,
    ) -> T {
        let (send, receive) = mpsc::channel();
        std::thread::spawn(move || {
            let path = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/testdata/models/grouped/ts_nofold_op17.onnx"
            );
            let model = Model::open(std::path::Path::new(path)).unwrap();
            let graph = crate::graph::GraphIndex::new(&model).unwrap();
            let index = Constants::new(&graph);
            let analysis = plan::analyse(&index, Default::default()).unwrap();
            send.send(body(&index, analysis))
        });
        match receive.recv_timeout(Duration::from_secs(120)) {
            Ok(value) => value,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the producer hung"),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the test body panicked"),
        }
    }

    /// Every block's weight as written by one queue (chunks of one output channel, three
    /// workers, every block in flight at once) against each block folded alone, and each one
    /// checked against its original subgraph.
    #[test]
    fn one_queue_for_all_blocks_writes_what_each_block_alone_writes() {
        finishes(|index, analysis| {
            let patch = crate::rewrite::build(index, &analysis);
            let plans = analysis.all();
            let order: Vec<usize> = (0..plans.len()).collect();
            let mut written = Vec::new();
            Producer::run_with(index, &plans, order.clone(), 3, 1, |producer| {
                for &p in &order {
                    let mut weight = Vec::new();
                    let sample: Vec<usize> = (0..plans[p].outputs()).collect();
                    let mut write = |bytes: &[u8]| {
                        weight.extend_from_slice(bytes);
                        Ok(())
                    };
                    let produced = producer.write_block(p, &mut write, &sample).unwrap();
                    written.push((weight, produced));
                }
            });
            assert!(plans.len() > 4, "{} blocks", plans.len());
            for (plan, (weight, produced)) in analysis.plans.iter().zip(&written) {
                let mut alone = Vec::new();
                let mut write = |bytes: &[u8]| {
                    alone.extend_from_slice(bytes);
                    Ok(())
                };
                let single = fold_block(index, Plan::Conv(plan), &mut write, &[]).unwrap();
                assert_eq!(weight, &alone, "{}", plan.name);
                assert_eq!(produced.bias, single.bias);
                let node = &patch.replaced[&plan.block.root][0];
                let (rows, bias) = (produced.sampled().unwrap(), produced.bias().unwrap());
                let deviation =
                    crate::verify::check(index, &plan.subject(), node, &rows, &bias, None);
                assert!(deviation.unwrap().rel < 1e-6, "{}", plan.name);
            }
        });
    }

    #[test]
    fn blocks_asked_for_out_of_order_are_an_error_not_a_hang() {
        let err = finishes(|index, analysis| {
            let plans = analysis.all();
            Producer::run_with(index, &plans, vec![0, 1], 2, 1, |producer| {
                producer
                    .write_block(1, &mut |_| Ok(()), &[])
                    .unwrap_err()
                    .to_string()
            })
        });
        assert!(err.contains("out of the planned order"), "{err}");
    }

    #[test]
    fn a_failing_writer_stops_the_workers() {
        let err = finishes(|index, analysis| {
            let plans = analysis.all();
            let order: Vec<usize> = (0..plans.len()).collect();
            Producer::run_with(index, &plans, order, 2, 1, |producer| {
                let mut full = |_: &[u8]| Err(Error::Graph("disk full".into()));
                producer
                    .write_block(0, &mut full, &[])
                    .unwrap_err()
                    .to_string()
            })
        });
        assert_eq!(err, "graph: disk full");
    }

    #[test]
    fn a_block_that_no_longer_folds_as_planned_says_so() {
        let err = finishes(|index, mut analysis| {
            analysis.plans[1].layout.out_channels += 1;
            let plans = analysis.all();
            let order: Vec<usize> = (0..plans.len()).collect();
            Producer::run_with(index, &plans, order, 2, 1, |producer| {
                producer.write_block(0, &mut |_| Ok(()), &[]).unwrap();
                producer
                    .write_block(1, &mut |_| Ok(()), &[])
                    .unwrap_err()
                    .to_string()
            })
        });
        let name = "folded to another shape than planned";
        assert!(err.contains(name), "{err}");
    }
}
