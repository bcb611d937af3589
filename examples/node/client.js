'use strict';
/**
 * A sync-to-device client for Node.js app servers and device apps.
 *
 * It speaks the wire contract of docs/wire.md: jobs go to the `sync.jobs` exchange as
 * persistent JSON on a confirm channel, and results come back over RabbitMQ's direct
 * reply-to, matched by correlation id. A caller that passes `onProgress` also gets the
 * job's progress reports (messages of type `progress`) before its result.
 *
 *   const { SyncClient } = require('./client');
 *   const client = await SyncClient.connect('amqp://sync:sync@127.0.0.1:5673/');
 *   const result = await client.synchronizeToDevice(
 *     { userId: 7, deviceId: 'dev-1' },
 *     { objects: [{ entity: 'WorkOrder', id: 1 }] },
 *   );
 *   await client.close();
 */

const crypto = require('node:crypto');
const amqp = require('amqplib');

const JOBS_EXCHANGE = 'sync.jobs';
const DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to';
// Set to true on a job to get its progress reports; replies say which they are by `type`.
const PROGRESS_HEADER = 'x-sync-progress';
const PROGRESS_TYPE = 'progress';
const DEVICE_USER_PREFIX = 'device.';
const SCHEMA_VERSION = 1;
const MAX_OBJECTS_PER_JOB = 100_000;
const MAX_QUERIES_PER_JOB = 100;
const MAX_CONSTRAINT_LENGTH = 4_000;
const MAX_ID = 2n ** 63n - 1n;

// The same patterns as broker/models.py; tests/test_node_client.py holds them to it.
const PATTERNS = Object.freeze({
  JOB_ID: '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$',
  ENTITY_NAME: '^[A-Za-z][A-Za-z0-9_]{0,62}(\\.[A-Za-z][A-Za-z0-9_]{0,62})?$',
  MEMBER_NAME: '^[A-Za-z][A-Za-z0-9_]{0,62}$',
  DEVICE_ID: '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$',
});
const RE = Object.fromEntries(Object.entries(PATTERNS).map(([k, v]) => [k, new RegExp(v)]));
const ORIGINS = new Set(['nanoflow', 'event']);
const STATUSES = new Set(['done', 'ignored', 'rejected']);

// --- errors: callers catch classes, never match message text -------------------------

class SyncError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = this.constructor.name;
  }
}
/** The job cannot be built as given (nothing was sent). */
class InvalidJob extends SyncError {}
/** The broker cannot be reached, or the connection was lost. */
class BrokerUnavailable extends SyncError {}
/** The broker refused the login or an operation (wrong secret, missing permission). */
class AccessRefused extends SyncError {}
/** The job went nowhere: no queue is bound to `sync.jobs`. */
class Unroutable extends SyncError {}
/** The broker refused the job (negative confirm: the jobs queue is full). */
class Refused extends SyncError {}
/** No confirm, or no result, in time. `jobId` says what to retry with. */
class SyncTimeout extends SyncError {
  constructor(message, jobId) {
    super(message);
    this.jobId = jobId;
  }
}

// --- building the job ---------------------------------------------------------------

/** A fresh job id: 32 hex digits. */
function newJobId() {
  return crypto.randomUUID().replaceAll('-', '');
}

/** The device an AMQP user name belongs to (`device.<id>`), or null. */
function deviceOfAccount(user) {
  if (typeof user !== 'string' || !user.startsWith(DEVICE_USER_PREFIX)) return null;
  return user.slice(DEVICE_USER_PREFIX.length) || null;
}

function checkPattern(value, pattern, what) {
  if (value === undefined) throw new InvalidJob(`${what} is required`);
  if (typeof value !== 'string' || !RE[pattern].test(value)) {
    throw new InvalidJob(`${what}: ${JSON.stringify(value)} does not match ${PATTERNS[pattern]}`);
  }
  return value;
}

/** An id as the wire wants it: an integer 1..2^63-1 (a safe integer Number, or a BigInt). */
function checkId(value, what) {
  const inRange =
    typeof value === 'bigint'
      ? value >= 1n && value <= MAX_ID
      : Number.isSafeInteger(value) && value >= 1;
  if (inRange) return value;
  const shown = typeof value === 'string' ? JSON.stringify(value) : String(value);
  throw new InvalidJob(`${what}: ${shown} is not an integer id in 1..2^63-1 (BigInt above 2^53)`);
}

function checkRef(ref, what) {
  if (ref === null || typeof ref !== 'object') {
    throw new InvalidJob(`${what}: expected {entity, id}`);
  }
  return {
    entity: checkPattern(ref.entity, 'ENTITY_NAME', `${what}.entity`),
    id: checkId(ref.id, `${what}.id`),
  };
}

/** A query: an entity and its XPath constraint, which the worker parses. */
function checkQuery(query, what) {
  if (query === null || typeof query !== 'object') {
    throw new InvalidJob(`${what}: expected {entity, constraint}`);
  }
  const { constraint } = query;
  // In characters (code points), as the worker counts them.
  const length = typeof constraint === 'string' ? [...constraint].length : 0;
  if (length < 1 || length > MAX_CONSTRAINT_LENGTH) {
    throw new InvalidJob(
      `${what}.constraint: expected a string of 1 to ${MAX_CONSTRAINT_LENGTH} characters`,
    );
  }
  return { entity: checkPattern(query.entity, 'ENTITY_NAME', `${what}.entity`), constraint };
}

function checkArray(value, what) {
  if (value === undefined) return [];
  if (!Array.isArray(value)) throw new InvalidJob(`${what}: expected an array`);
  return value;
}

/**
 * The job as the wire contract has it, checked: `buildJob({userId: 7, deviceId: 'dev-1'},
 * {objects: [{entity: 'WorkOrder', id: 1}]})`.
 *
 * `uncommitted` is an array of `{ref: {entity, id}, changes: {member: value}}`.
 */
function buildJob(session, targets = {}) {
  if (session === null || typeof session !== 'object') {
    throw new InvalidJob('session: expected {userId, deviceId}');
  }
  const origin = targets.origin ?? 'nanoflow';
  if (!ORIGINS.has(origin)) {
    throw new InvalidJob(`origin: ${JSON.stringify(origin)} is not nanoflow or event`);
  }
  const job = {
    schema_version: SCHEMA_VERSION,
    job_id: checkPattern(targets.jobId ?? newJobId(), 'JOB_ID', 'job_id'),
    session: {
      user_id: checkId(session.userId, 'session.user_id'),
      device_id: checkPattern(session.deviceId, 'DEVICE_ID', 'session.device_id'),
    },
    origin,
    objects: checkArray(targets.objects, 'objects').map((ref, i) => checkRef(ref, `objects[${i}]`)),
    lists: checkArray(targets.lists, 'lists').map((list, i) => ({
      entity: checkPattern(list?.entity, 'ENTITY_NAME', `lists[${i}].entity`),
      ids: checkArray(list?.ids, `lists[${i}].ids`).map((id, j) =>
        checkId(id, `lists[${i}].ids[${j}]`),
      ),
    })),
    queries: checkArray(targets.queries, 'queries').map((query, i) =>
      checkQuery(query, `queries[${i}]`),
    ),
    deleted: checkArray(targets.deleted, 'deleted').map((ref, i) => checkRef(ref, `deleted[${i}]`)),
    new: checkArray(targets.new, 'new').map((ref, i) => checkRef(ref, `new[${i}]`)),
    uncommitted: checkArray(targets.uncommitted, 'uncommitted').map((change, i) => {
      const changes = change?.changes;
      if (changes === null || typeof changes !== 'object' || Array.isArray(changes)) {
        throw new InvalidJob(`uncommitted[${i}].changes: expected an object of member: value`);
      }
      for (const member of Object.keys(changes)) {
        checkPattern(member, 'MEMBER_NAME', `uncommitted[${i}].changes`);
      }
      return { ref: checkRef(change.ref, `uncommitted[${i}].ref`), changes };
    }),
  };
  const named =
    job.objects.length +
    job.lists.reduce((n, list) => n + list.ids.length, 0) +
    job.deleted.length +
    job.new.length +
    job.uncommitted.length;
  if (named > MAX_OBJECTS_PER_JOB) {
    throw new InvalidJob(`job names ${named} objects; at most ${MAX_OBJECTS_PER_JOB} per job`);
  }
  if (job.queries.length > MAX_QUERIES_PER_JOB) {
    throw new InvalidJob(`job has ${job.queries.length} queries; at most ${MAX_QUERIES_PER_JOB}`);
  }
  const text = job.queries.reduce((n, query) => n + [...query.constraint].length, 0);
  if (text > MAX_CONSTRAINT_LENGTH) {
    throw new InvalidJob(
      `the queries' constraints have ${text} characters; at most ${MAX_CONSTRAINT_LENGTH} per job`,
    );
  }
  // Left out when empty: workers from before queries refuse the field.
  if (job.queries.length === 0) delete job.queries;
  return job;
}

/**
 * JSON text of `value`, with BigInts as integers; NaN and Infinity are refused (the
 * worker refuses them too, and JSON.stringify would silently send null).
 */
function encodeJson(value, where = '$') {
  switch (typeof value) {
    case 'bigint':
      return value.toString();
    case 'number':
      if (!Number.isFinite(value)) throw new InvalidJob(`${where}: ${value} is not valid JSON`);
      return JSON.stringify(value);
    case 'string':
    case 'boolean':
      return JSON.stringify(value);
    case 'object':
      if (value === null) return 'null';
      if (Array.isArray(value)) {
        return `[${value.map((item, i) => encodeJson(item, `${where}[${i}]`)).join(',')}]`;
      }
      if (typeof value.toJSON === 'function') return encodeJson(value.toJSON(), where);
      return `{${Object.entries(value)
        .filter(([, item]) => item !== undefined)
        .map(([key, item]) => `${JSON.stringify(key)}:${encodeJson(item, `${where}.${key}`)}`)
        .join(',')}}`;
    default:
      throw new InvalidJob(`${where}: a ${typeof value} cannot be sent as JSON`);
  }
}

/** A result body as the worker sent it, or null when it is not one. */
function parseResult(body) {
  let result;
  try {
    result = JSON.parse(body.toString('utf8'));
  } catch {
    return null;
  }
  const valid =
    result !== null &&
    typeof result === 'object' &&
    result.schema_version === SCHEMA_VERSION &&
    typeof result.job_id === 'string' &&
    STATUSES.has(result.status);
  return valid ? result : null;
}

/** A progress report `{job_id, published, total}` as the worker sends it, or null. */
function parseProgress(body) {
  let progress;
  try {
    progress = JSON.parse(body.toString('utf8'));
  } catch {
    return null;
  }
  const valid =
    progress !== null &&
    typeof progress === 'object' &&
    progress.schema_version === SCHEMA_VERSION &&
    typeof progress.job_id === 'string' &&
    Number.isInteger(progress.published) &&
    Number.isInteger(progress.total) &&
    progress.published >= 1 &&
    progress.published <= progress.total;
  return valid ? progress : null;
}

// --- the broker -----------------------------------------------------------------------

/** `amqp://user:secret@host:port/vhost` as `host:port`: for messages, never the secret. */
function describeUrl(url) {
  try {
    const parts = new URL(url);
    return `${parts.hostname}:${parts.port || (parts.protocol === 'amqps:' ? 5671 : 5672)}`;
  } catch {
    return 'the broker (unparsable URL)';
  }
}

/** The AMQP user the URL logs in as; the broker checks the job's `user_id` against it. */
function amqpUser(url) {
  const user = new URL(url).username;
  return user ? decodeURIComponent(user) : 'guest';
}

const UNREACHABLE = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ETIMEDOUT',
  'EPIPE',
]);

// AMQP reply codes: access-refused; connection-forced (an operator closed it, or the
// node is shutting down) and internal-error, after which another attempt may work.
const ACCESS_REFUSED = 403;
const GONE = new Set([320, 541]);

/** An amqplib or socket error as one of ours. */
function brokerError(error, where) {
  if (error instanceof SyncError) return error;
  const codes = [error?.code, ...(error?.errors ?? []).map((inner) => inner?.code)];
  if (codes.some((code) => UNREACHABLE.has(code))) {
    return new BrokerUnavailable(
      `cannot reach the broker at ${where}: ${codes.find((c) => UNREACHABLE.has(c))}`,
      { cause: error },
    );
  }
  const text = String(error?.message ?? error);
  // A login refused in the handshake has no code of its own, only the broker's text.
  if (error?.code === ACCESS_REFUSED || /ACCESS[-_]REFUSED/.test(text)) {
    return new AccessRefused(`the broker at ${where} refused: ${text}`, { cause: error });
  }
  if (typeof error?.code === 'number' && !GONE.has(error.code)) {
    // The broker closed the channel over what we asked (404, 406 ...): retrying will not help.
    return new SyncError(`the broker at ${where} refused: ${text}`, { cause: error });
  }
  return new BrokerUnavailable(`broker at ${where}: ${text}`, { cause: error });
}

function withTimeout(promise, ms, onTimeout) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(onTimeout()), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

class SyncClient {
  /**
   * Connect, open a confirm channel, check that `sync.jobs` exists and start consuming
   * direct reply-to (before any publish, as RabbitMQ requires).
   */
  static async connect(
    url,
    { name = 'sync-client-node', publishTimeoutMs = 10_000, connectTimeoutMs = 10_000 } = {},
  ) {
    const where = describeUrl(url);
    const user = amqpUser(url);
    const opening = amqp.connect(url, {
      clientProperties: { connection_name: name },
      timeout: connectTimeoutMs,
    });
    let connection;
    try {
      connection = await withTimeout(
        opening,
        connectTimeoutMs,
        () =>
          new BrokerUnavailable(
            `no answer from the broker at ${where} within ${connectTimeoutMs} ms`,
          ),
      );
    } catch (error) {
      // A connection that opens after we gave up must not keep the process alive.
      opening.then((late) => late.close()).catch(() => {});
      throw brokerError(error, where);
    }
    const client = new SyncClient(connection, { user, where, publishTimeoutMs });
    try {
      await client.#open();
    } catch (error) {
      await client.close();
      throw error;
    }
    return client;
  }

  #connection;
  #channel = null;
  #user;
  #where;
  #publishTimeoutMs;
  #pending = new Map(); // job id -> {resolve, reject, onProgress}
  #returned = new Set(); // job ids the broker returned as unroutable
  #closed = null; // the error that ended the client, once it ended

  constructor(connection, { user, where, publishTimeoutMs }) {
    this.#connection = connection;
    this.#user = user;
    this.#where = where;
    this.#publishTimeoutMs = publishTimeoutMs;
    // Without an 'error' listener, an error event would crash the process.
    connection.on('error', () => {});
    connection.on('close', (error) =>
      this.#end(
        error ? brokerError(error, where) : new BrokerUnavailable(`connection to ${where} closed`),
      ),
    );
  }

  /** The AMQP user this client publishes as (its jobs carry it as `user_id`). */
  get user() {
    return this.#user;
  }

  /** The device this client speaks for when it logs in as `device.<id>`, else null. */
  get ownDevice() {
    return deviceOfAccount(this.#user);
  }

  async #open() {
    let channel;
    try {
      channel = await this.#connection.createConfirmChannel();
    } catch (error) {
      throw brokerError(error, this.#where);
    }
    this.#channel = channel;
    // A channel error (say, a refused permission) comes just before its close.
    channel.on('error', (error) => this.#end(brokerError(error, this.#where)));
    channel.on('close', () =>
      this.#end(this.#closed ?? new BrokerUnavailable(`channel to ${this.#where} closed`)),
    );
    channel.on('return', (message) => this.#returned.add(message.properties.messageId));
    try {
      // Passive: device accounts may not declare; operators declare the topology.
      await channel.checkExchange(JOBS_EXCHANGE);
    } catch (error) {
      if (error?.code === 404) {
        throw new Unroutable(
          `exchange ${JOBS_EXCHANGE} does not exist on ${this.#where}: run \`syncctl topology declare\``,
          { cause: error },
        );
      }
      throw brokerError(error, this.#where);
    }
    await channel.consume(DIRECT_REPLY_TO, (message) => this.#onReply(message), { noAck: true });
  }

  #onReply(message) {
    if (message === null) {
      this.#end(new BrokerUnavailable('the broker cancelled the reply consumer'));
      return;
    }
    if (message.properties.type === PROGRESS_TYPE) {
      const progress = parseProgress(message.content);
      if (progress === null) return;
      // A job no longer waited for (or that did not ask) is not reported.
      const waiting = this.#pending.get(message.properties.correlationId ?? progress.job_id);
      waiting?.onProgress?.(progress);
      return;
    }
    const result = parseResult(message.content);
    if (result === null) return; // not a result of ours: nothing to resolve
    const waiting = this.#pending.get(message.properties.correlationId ?? result.job_id);
    waiting?.resolve(result);
  }

  #end(error) {
    this.#closed ??= error;
    for (const waiting of this.#pending.values()) waiting.reject(this.#closed);
    this.#pending.clear();
  }

  /**
   * Ask to synchronize objects and lists to the session's device.
   *
   * With `wait` (the default) resolves to the worker's result (`{status, synced, removed,
   * skipped, objects, batch_ids, ...}`, as on the wire); otherwise to the job id once the
   * broker confirmed the job. Pass your own `jobId` to retry safely: the same id has the
   * effect of one submission.
   *
   * A device account (`device.<id>`) speaks for its own device only: `deviceId` defaults
   * to it, and the worker uses the device's registered user whatever `userId` says.
   *
   * `onProgress` (with `wait`) is called with each progress report of the job while it
   * runs, `{job_id, published, total}`: batches confirmed of the job's total, rising. A
   * job that sends nothing, or is rejected, reports none; reports are best effort.
   */
  async synchronizeToDevice(
    session,
    { wait = true, timeoutMs = 10_000, onProgress = null, ...targets } = {},
  ) {
    const own = this.ownDevice;
    const deviceId = session?.deviceId ?? own;
    if (own !== null && deviceId !== own) {
      throw new InvalidJob(`account ${this.#user} can only sync to device ${own}, not ${deviceId}`);
    }
    const job = buildJob({ ...session, deviceId }, targets);
    const body = Buffer.from(encodeJson(job), 'utf8');
    if (!wait) {
      if (onProgress !== null) {
        throw new InvalidJob('onProgress needs wait: progress goes to the caller');
      }
      await this.#publish(body, job.job_id, job.session.device_id, false);
      return job.job_id;
    }
    if (this.#pending.has(job.job_id)) {
      throw new InvalidJob(`job ${job.job_id} is already waiting for its result on this client`);
    }
    const result = new Promise((resolve, reject) =>
      this.#pending.set(job.job_id, { resolve, reject, onProgress }),
    );
    result.catch(() => {}); // observed below; never an unhandled rejection meanwhile
    try {
      await this.#publish(body, job.job_id, job.session.device_id, true, onProgress !== null);
      return await withTimeout(
        result,
        timeoutMs,
        () =>
          new SyncTimeout(
            `no result for job ${job.job_id} within ${timeoutMs} ms; it may still run: retry with the same job id`,
            job.job_id,
          ),
      );
    } finally {
      this.#pending.delete(job.job_id);
    }
  }

  async #publish(body, jobId, deviceId, reply, progress = false) {
    if (this.#closed) throw this.#closed;
    const properties = {
      persistent: true,
      contentType: 'application/json',
      messageId: jobId,
      correlationId: jobId,
      userId: this.#user,
      mandatory: true,
      ...(reply ? { replyTo: DIRECT_REPLY_TO } : {}),
      ...(progress ? { headers: { [PROGRESS_HEADER]: true } } : {}),
    };
    const confirmed = new Promise((resolve, reject) => {
      // The routing key (the device) lets a hashing exchange keep a device's jobs on one
      // queue; the fanout exchange ignores it.
      this.#channel.publish(JOBS_EXCHANGE, deviceId, body, properties, (error) => {
        // A return (unroutable) always arrives before the confirm of the same message.
        const returned = this.#returned.delete(jobId);
        if (error) {
          // amqplib fails unconfirmed publishes from a 'close' listener of its own, before
          // ours has run: decide once the close (if that is what it was) is through.
          queueMicrotask(() => reject(this.#closed ?? this.#refused(jobId)));
        } else if (returned) {
          reject(
            new Unroutable(`job ${jobId} was not routed: no queue is bound to ${JOBS_EXCHANGE}`),
          );
        } else {
          resolve();
        }
      });
    });
    confirmed.catch(() => {});
    await withTimeout(
      confirmed,
      this.#publishTimeoutMs,
      () =>
        new SyncTimeout(
          `the broker did not confirm job ${jobId} within ${this.#publishTimeoutMs} ms; ` +
            'whether it went out is unknown: retry with the same job id',
          jobId,
        ),
    );
  }

  #refused(jobId) {
    return new Refused(
      `the broker refused job ${jobId} (a negative confirm: the jobs queue is full)`,
    );
  }

  /** Close the connection; calls still waiting fail with BrokerUnavailable. */
  async close() {
    this.#end(new BrokerUnavailable('client closed'));
    try {
      await this.#connection.close();
    } catch {
      // Already closed (the broker went away): nothing left to release.
    }
  }
}

module.exports = {
  AccessRefused,
  BrokerUnavailable,
  DIRECT_REPLY_TO,
  InvalidJob,
  JOBS_EXCHANGE,
  MAX_CONSTRAINT_LENGTH,
  MAX_OBJECTS_PER_JOB,
  MAX_QUERIES_PER_JOB,
  PATTERNS,
  Refused,
  SyncClient,
  SyncError,
  SyncTimeout,
  Unroutable,
  buildJob,
  deviceOfAccount,
  encodeJson,
  newJobId,
  parseProgress,
  parseResult,
};
