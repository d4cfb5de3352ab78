// penaltyd: statistical SMTP error penalties for Haraka 3.x.
//
// Checks: at each accepted recipient (hook_rcpt_ok, after the plugins that decide
// whether a recipient exists), the plugin asks penalty-policyd over the Postfix policy
// protocol, the same sidecar Postfix and Exim ask: `name=value` lines and an empty line,
// answered `action=<reply>` or `action=DUNNO`. A 4xx reply is a DENYSOFT with exactly
// penaltyd's reply: its code (Haraka's DENYSOFT alone is always 450), enhanced status
// code, text and seconds left. The sidecar reports each recipient it is asked about and
// answers DUNNO as accepted (the denominator), so the check sits after acceptance.
//
// Reports: Haraka's own rejections (recipients refused with 5xx by any plugin or by
// Haraka itself, messages refused at DATA, protocol errors, MAIL and HELO refused by a
// plugin) are counted per client and reported as penaltyd outcomes over gRPC (the
// Report RPC, HTTP/2 from node:http2, no dependency). penalty-policyd has no request for
// reports yet; see README.md beside this file.
//
// Never in the way: every failure (sidecar down, slow, garbage answers, a bug here) is
// answered `next()`, within `timeout` milliseconds, well inside Haraka's plugin timeout
// (which would otherwise answer a DENYSOFT of its own).

'use strict'

const net = require('node:net')
const http2 = require('node:http2')

// penalty.v1.Outcome values (proto/penalty/v1/penalty.proto).
const OUTCOME = {
    UNKNOWN_RECIPIENT: 2,
    RELAY_DENIED: 3,
    BAD_HELO: 4,
    PROTOCOL_VIOLATION: 5,
    SENDER_REJECTED: 7,
    CONTENT_REJECTED: 8,
}
const MAX_ANSWER = 64 * 1024 // bytes of answers buffered before the stream counts as garbage
const REPLY = /^action=(4\d\d)\s+(\S.*)$/ // a temporary refusal with its text; else DUNNO

let DSN = null
try {
    DSN = require('haraka-dsn')
} catch {
    DSN = null // Haraka 3 ships haraka-dsn; without it our own object of that name
}

exports.register = function () {
    this.load_penaltyd_ini()
    this.policy = new PolicyClient(this)
    this.reporter = new Reporter(this)
    this.register_hook('rcpt', 'count_rejections', -100) // first: what the last RCPT got
    this.register_hook('rcpt_ok', 'check')
    this.register_hook('deny', 'on_deny')
    for (const hook of ['mail', 'data', 'rset', 'quit', 'disconnect']) {
        this.register_hook(hook, 'count_rejections', -100)
    }
}

exports.load_penaltyd_ini = function () {
    const ini = this.config.get('penaltyd.ini', { booleans: ['+report.enabled'] }, () =>
        this.load_penaltyd_ini(),
    )
    const policyd = ini.policyd || {}
    const report = ini.report || {}
    this.cfg = {
        socket: policyd.socket || '',
        host: policyd.host || '127.0.0.1',
        port: parseInt(policyd.port, 10) || 10040,
        timeout: parseInt(policyd.timeout, 10) || 1000,
        report: report.enabled !== false,
        penaltyd: report.penaltyd || '127.0.0.1:50051',
        report_timeout: parseInt(report.timeout, 10) || 1000,
        flush_ms: parseInt(report.flush_ms, 10) || 10,
        token: report.token || process.env.PENALTYD_TOKEN || '',
    }
}

exports.shutdown = function () {
    if (this.policy) this.policy.close()
    if (this.reporter) this.reporter.close()
}

// --- the check, at each accepted recipient

exports.check = function (next, connection, params) {
    let done = false
    const finish = (code, msg) => {
        if (done) return
        done = true
        if (code === undefined) return next()
        next(code, msg)
    }
    try {
        const txn = connection.transaction
        const rcpt = params && params[0]
        if (!txn || !connection.remote || !connection.remote.ip) return finish()
        const attrs = {
            request: 'smtpd_access_policy',
            protocol_state: 'RCPT',
            protocol_name: connection.esmtp ? 'ESMTP' : 'SMTP',
            client_address: connection.remote.ip,
            client_name: connection.remote.host || 'unknown',
            helo_name: (connection.hello && connection.hello.host) || '',
            sender: address_of(txn.mail_from),
            recipient: address_of(rcpt),
            queue_id: txn.uuid || '',
        }
        this.policy.ask(attrs, (answer) => {
            try {
                const match = answer ? REPLY.exec(answer) : null
                if (!match) return finish()
                connection.loginfo(this, `penalized: ${match[1]} ${match[2]}`)
                finish(DENYSOFT, reply_of(match[1], match[2]))
            } catch (err) {
                connection.logerror(this, `answer not used: ${err}`)
                finish()
            }
        })
    } catch (err) {
        connection.logerror(this, `check skipped: ${err}`)
        finish()
    }
}

// The reply Haraka writes: respond() takes the code of a message object whose class is
// named DSN, and its `reply` as the text, so the code and the enhanced status code are
// penaltyd's, not DENYSOFT's fixed 450 nor a made-up X.0.0.
function reply_of(code, text) {
    if (DSN) {
        const dsn = new DSN(parseInt(code, 10), text, 450)
        dsn.reply = text // exactly as configured (haraka-dsn would prefix its own X.Y.Z)
        return dsn
    }
    return new (class DSN {
        constructor() {
            this.code = parseInt(code, 10)
            this.reply = text
        }
        toString() {
            return this.reply
        }
    })()
}

function address_of(addr) {
    if (!addr) return ''
    const a = typeof addr.address === 'function' ? addr.address() : addr.address // 2.x: a method
    if (typeof a === 'string') return a
    return addr.user && addr.host ? `${addr.user}@${addr.host}` : ''
}

function one_line(value) {
    return String(value).replace(/[\r\n]+/g, ' ')
}

// --- reports of Haraka's own rejections

// A recipient refused with 5xx (by any plugin or by Haraka: "I cannot deliver mail for"),
// a message refused at DATA, and a protocol error each raise one of Haraka's counters;
// what each counter rose by since the last look is reported. Looked at before each RCPT,
// MAIL, DATA, RSET, QUIT and at disconnect, so a dictionary attack is counted as it goes.
exports.count_rejections = function (next, connection) {
    try {
        this.take_counts(connection)
    } catch (err) {
        connection.logerror(this, `counting skipped: ${err}`)
    }
    next()
}

exports.take_counts = function (connection) {
    if (!this.cfg.report || !connection.remote || !connection.remote.ip) return
    const seen = connection.notes.penaltyd_seen || { rcpt: 0, msg: 0, errors: 0 }
    connection.notes.penaltyd_seen = seen
    const now = {
        rcpt: (connection.rcpt_count && connection.rcpt_count.reject) || 0,
        msg: (connection.msg_count && connection.msg_count.reject) || 0,
        errors: connection.errors || 0,
    }
    const rcpt = now.rcpt - seen.rcpt
    if (rcpt > 0) {
        // Haraka's own refusal (no plugin vouched for the domain) and 5.7.x: relaying.
        const last = connection.last_reject || ''
        const relay = /cannot deliver mail for|\b5\.7\.\d+\b|relay/i.test(last)
        this.report(connection, relay ? OUTCOME.RELAY_DENIED : OUTCOME.UNKNOWN_RECIPIENT, rcpt)
    }
    if (now.msg > seen.msg) this.report(connection, OUTCOME.CONTENT_REJECTED, now.msg - seen.msg)
    if (now.errors > seen.errors) {
        this.report(connection, OUTCOME.PROTOCOL_VIOLATION, now.errors - seen.errors)
    }
    Object.assign(seen, now)
}

// Hard refusals at MAIL and HELO/EHLO, which no counter records (a recipient's and a
// message's are counted above; our own DENYSOFT is not an error).
exports.on_deny = function (next, connection, params) {
    try {
        const [retval, , plugin, , , hook] = params || []
        if (plugin !== this.name && (retval === DENY || retval === DENYDISCONNECT)) {
            if (hook === 'mail') this.report(connection, OUTCOME.SENDER_REJECTED, 1)
            if (hook === 'helo' || hook === 'ehlo') this.report(connection, OUTCOME.BAD_HELO, 1)
        }
    } catch (err) {
        connection.logerror(this, `deny not counted: ${err}`)
    }
    next()
}

exports.report = function (connection, outcome, n) {
    if (!this.cfg.report) return
    const txn = connection.transaction
    this.reporter.add(
        connection.remote.ip,
        (connection.hello && connection.hello.host) || '',
        txn ? address_of(txn.mail_from) : '',
        outcome,
        n,
    )
}

// --- the policy connection: one per Haraka process, requests pipelined, answered in order

class PolicyClient {
    constructor(plugin) {
        this.plugin = plugin
        this.warnings = new Warnings(plugin)
        this.socket = null
        this.pending = [] // callbacks, oldest first
        this.buf = ''
        this.timer = null
    }

    ask(attrs, cb) {
        const cfg = this.plugin.cfg
        let request = ''
        for (const [k, v] of Object.entries(attrs)) request += `${k}=${one_line(v)}\n`
        const entry = { cb, deadline: Date.now() + cfg.timeout }
        this.pending.push(entry)
        try {
            this.connect().write(`${request}\n`)
        } catch (err) {
            this.fail(`write failed: ${err}`)
            return
        }
        if (!this.timer) this.arm()
    }

    connect() {
        if (this.socket) return this.socket
        const cfg = this.plugin.cfg
        const socket = cfg.socket ? net.connect(cfg.socket) : net.connect(cfg.port, cfg.host)
        socket.setNoDelay(true)
        socket.setEncoding('utf8')
        socket.on('data', (chunk) => this.received(socket, chunk))
        socket.on('error', (err) => this.fail(`policyd: ${err.message}`, socket))
        socket.on('close', () => this.fail('policyd closed the connection', socket))
        this.socket = socket
        return socket
    }

    received(socket, chunk) {
        if (socket !== this.socket) return
        this.buf += chunk
        let end
        while ((end = this.buf.indexOf('\n\n')) >= 0) {
            const answer = this.buf.slice(0, end)
            this.buf = this.buf.slice(end + 2)
            const entry = this.pending.shift()
            if (!entry) return this.fail('an answer nobody asked for')
            entry.cb(answer.split('\n').find((line) => line.startsWith('action=')) || '')
        }
        if (this.buf.length > MAX_ANSWER) this.fail('answer too long')
        if (!this.pending.length) this.disarm()
        else this.arm()
    }

    // One timer, for the oldest request: when it is late the stream is out of step (its
    // answer may still come), so the connection is dropped and every waiting request is
    // answered DUNNO; the next request connects again.
    warn(why) {
        this.warnings.warn(why)
    }

    arm() {
        this.disarm()
        const head = this.pending[0]
        if (!head) return
        this.timer = setTimeout(
            () => this.fail(`no answer within ${this.plugin.cfg.timeout} ms`),
            Math.max(0, head.deadline - Date.now()),
        )
    }

    disarm() {
        if (this.timer) clearTimeout(this.timer)
        this.timer = null
    }

    fail(why, socket) {
        if (socket && socket !== this.socket) return // an old connection's last events
        const waiting = this.pending
        this.pending = []
        this.buf = ''
        this.disarm()
        if (this.socket) {
            this.socket.destroy()
            this.socket = null
        }
        if (waiting.length) this.warn(`${why}: ${waiting.length} check(s) answered DUNNO`)
        for (const entry of waiting) entry.cb(null)
    }

    close() {
        this.fail('shutting down')
    }
}

// One warning a minute at most, with how many were not logged: a sidecar or penaltyd that
// is down must not flood Haraka's log at every recipient.
class Warnings {
    constructor(plugin) {
        this.plugin = plugin
        this.last = 0
        this.suppressed = 0
    }

    warn(why) {
        const now = Date.now()
        if (now - this.last < 60000) {
            this.suppressed += 1
            return
        }
        const more = this.suppressed ? ` (${this.suppressed} more since the last warning)` : ''
        this.plugin.logwarn(`${why}${more}; mail unaffected`)
        this.last = now
        this.suppressed = 0
    }
}

// --- reports: penaltyd's Report RPC, counts per (address, HELO, sender) sent every flush_ms

class Reporter {
    constructor(plugin) {
        this.plugin = plugin
        this.waiting = new Map()
        this.timer = null
        this.session = null
        this.warnings = new Warnings(plugin)
    }

    add(ip, helo, sender, outcome, n) {
        const key = JSON.stringify([ip, helo, sender, outcome])
        this.waiting.set(key, (this.waiting.get(key) || 0) + n)
        if (!this.timer) this.timer = setTimeout(() => this.flush(), this.plugin.cfg.flush_ms)
    }

    flush() {
        this.timer = null
        const waiting = this.waiting
        this.waiting = new Map()
        for (const [key, n] of waiting) {
            const [ip, helo, sender, outcome] = JSON.parse(key)
            this.send(report_request(ip, helo, sender, outcome, n))
        }
    }

    connect() {
        if (this.session && !this.session.closed && !this.session.destroyed) return this.session
        const session = http2.connect(`http://${this.plugin.cfg.penaltyd}`)
        session.on('error', () => {}) // each request says what failed
        session.on('close', () => {
            if (this.session === session) this.session = null
        })
        session.unref() // an idle report channel keeps no process alive
        this.session = session
        return session
    }

    send(message) {
        const cfg = this.plugin.cfg
        let req
        try {
            const headers = {
                ':method': 'POST',
                ':path': '/penalty.v1.PenaltyService/Report',
                'content-type': 'application/grpc',
                te: 'trailers',
                'grpc-timeout': `${cfg.report_timeout}m`,
            }
            if (cfg.token) headers.authorization = `Bearer ${cfg.token}`
            req = this.connect().request(headers)
        } catch (err) {
            this.warnings.warn(`report to penaltyd not sent: ${err.message}`)
            return
        }
        let status = null
        let error = ''
        const take = (headers) => {
            if (headers['grpc-status'] !== undefined) status = String(headers['grpc-status'])
        }
        req.setTimeout(cfg.report_timeout, () => req.close(http2.constants.NGHTTP2_CANCEL))
        req.on('response', take)
        req.on('trailers', take)
        req.on('data', () => {}) // the Verdict: not needed
        req.on('error', (err) => {
            error = err.message
        })
        req.on('close', () => {
            if (status === '0') return
            const why = error || `grpc-status ${status === null ? 'none (timeout)' : status}`
            this.warnings.warn(`report to penaltyd lost: ${why}`)
        })
        const frame = Buffer.alloc(5 + message.length)
        frame.writeUInt32BE(message.length, 1)
        message.copy(frame, 5)
        req.end(frame)
    }

    close() {
        if (this.timer) clearTimeout(this.timer)
        this.timer = null
        if (this.session) this.session.close()
        this.session = null
    }
}

// penalty.v1.ReportRequest{client: Client{ip, helo, mail_from}, counts: [{outcome, n}]},
// protobuf-encoded. A HELO or sender over penaltyd's bounds (255 and 512 bytes) is left
// out rather than cut (a cut could split a UTF-8 character and the report be refused).
function report_request(ip, helo, sender, outcome, n) {
    const client = Buffer.concat([
        string_field(1, ip),
        Buffer.byteLength(helo) <= 255 ? string_field(2, helo) : Buffer.alloc(0),
        Buffer.byteLength(sender) <= 512 ? string_field(3, sender) : Buffer.alloc(0),
    ])
    const count = Buffer.concat([varint_field(1, outcome), varint_field(2, Math.min(n, 1000))])
    return Buffer.concat([bytes_field(1, client), bytes_field(2, count)])
}

function varint(value) {
    const out = []
    let v = value >>> 0
    while (v > 0x7f) {
        out.push((v & 0x7f) | 0x80)
        v >>>= 7
    }
    out.push(v)
    return Buffer.from(out)
}

function varint_field(field, value) {
    return Buffer.concat([varint(field << 3), varint(value)])
}

function bytes_field(field, bytes) {
    return Buffer.concat([varint((field << 3) | 2), varint(bytes.length), bytes])
}

function string_field(field, text) {
    return text ? bytes_field(field, Buffer.from(text, 'utf8')) : Buffer.alloc(0)
}
