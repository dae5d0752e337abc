//! What the import knows of HAProxy: each directive, what it becomes here, and why when it
//! does not translate exactly. The report's reasons and docs/coming-from-haproxy.md both come
//! from this one table.

/// How a directive comes across.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Does here what it does in HAProxy: never in the report.
    Translated,
    /// Written, but what it does here differs: in the report.
    Approximate,
    /// Left out: in the report.
    NotTranslated,
}

impl Fate {
    pub fn as_str(self) -> &'static str {
        match self {
            Fate::Translated => "translated",
            Fate::Approximate => "approximate",
            Fate::NotTranslated => "not translated",
        }
    }
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct Info {
    /// Where it is written in haproxy.cfg.
    pub section: &'static str,
    /// The directive as HAProxy's documentation names it.
    pub haproxy: &'static str,
    /// What it becomes here (empty: nothing).
    pub ours: &'static str,
    pub fate: Fate,
    /// Why it does not translate exactly (empty when it does).
    pub why: &'static str,
    /// What to do instead (empty when it translates).
    pub instead: &'static str,
}

macro_rules! topics {
    ($($id:ident: $section:literal, $haproxy:literal => $ours:literal, $fate:ident, $why:literal, $instead:literal;)*) => {
        /// A row of the table: what a line of the report is about.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
        pub enum Topic { $($id,)* }

        impl Topic {
            /// Every row, in the order of the documentation.
            pub const ALL: &[Topic] = &[$(Topic::$id,)*];

            pub fn info(self) -> Info {
                match self {
                    $(Topic::$id => Info {
                        section: $section,
                        haproxy: $haproxy,
                        ours: $ours,
                        fate: Fate::$fate,
                        why: $why,
                        instead: $instead,
                    },)*
                }
            }
        }
    };
}

topics! {
    // global
    StatsSocketExposeFd: "global", "`stats socket PATH ... expose-fd listeners`" => "fdkeeper's lending socket (`socket` in fdkeeper.toml, `fdkeeper_socket` in proxyd.toml)", Translated, "", "";
    StatsSocket: "global", "`stats socket` (the runtime API)" => "gRPC admin sockets: proxyd's `admin_socket`, stickd's `socket`", Approximate,
        "the runtime API is gRPC with reflection (grpcurl, `proxyd status`, `proxyd reload`), not HAProxy's text commands; the socket's mode and level are not carried",
        "`grpcurl -plaintext -authority localhost -unix /run/proxyd/admin.sock list` for servers, the same on `/run/stickd/stickd.sock` for tables (docs/coming-from-haproxy.md lists the commands)";
    MasterWorker: "global", "`master-worker`, `-W`, `-x` (seamless reload)" => "always: proxyd's master and worker generations, listeners lent by fdkeeper", Translated, "", "";
    UserGroup: "global", "`user`, `group`" => "`User=`/`Group=` in the proxyd.service drop-in, the user in fdkeeper's `allowed_uids`", Translated, "", "";
    NoUser: "global", "no `user` in `global`" => "fdkeeper `allowed_uids = [\"root\"]`", Approximate,
        "HAProxy kept the user that started it; fdkeeper lends listeners only to the users it names",
        "add the user proxyd runs as (`proxyd` with dist/systemd's units) to `allowed_uids`";
    GlobalMaxconn: "global", "`maxconn` (global)" => "`maxconn` in `[defaults]` when no `defaults` section sets one", Approximate,
        "proxyd has no process-wide connection limit: each frontend has its own",
        "set `maxconn` per frontend; `LimitNOFILE=` in proxyd.service bounds the descriptors";
    Nbthread: "global", "`nbthread`" => "`threads` in `[global]`", Translated, "", "";
    Nbproc: "global", "`nbproc`" => "", NotTranslated,
        "proxyd runs one worker process per generation, with threads",
        "set `threads` in `[global]` (`nbthread`)";
    HardStopAfter: "global", "`hard-stop-after`" => "`drain_timeout` in `[global]`", Translated, "", "";
    Log: "global", "`log /dev/log FACILITY` (a unix socket)" => "`access_log = \"syslog\"`, `syslog_socket`, `syslog_facility` in `[global]`", Translated, "", "";
    LogRemote: "global", "`log ADDRESS:PORT FACILITY` (UDP), `log stdout`, a second `log`, a level below info, `log-tag`, `log-send-hostname`" => "syslog on `/dev/log` (a network address), stderr (`stdout`)", Approximate,
        "proxyd sends syslog to one unix socket only, every request at severity info",
        "have the local syslog daemon (rsyslog, or journald's /dev/log and `ForwardToSyslog=`) forward to that address";
    Chroot: "global", "`chroot`" => "the units' sandbox (`ProtectSystem=strict`, `PrivateTmp=`, ...)", Approximate,
        "proxyd reads no file once started but its certificates; systemd confines it instead",
        "install dist/systemd's units, which sandbox every daemon";
    Daemon: "global", "`daemon`, `pidfile`" => "systemd (`Type=notify`) runs and tracks proxyd in the foreground", Approximate,
        "proxyd does not fork into the background or write a pid file",
        "run it with dist/systemd's units; `proxyd status` shows the master and its workers";
    CrtBase: "global", "`crt-base`" => "the certificate paths of `bind ... crt` are written in full", Translated, "", "";
    SslDefaults: "global", "`ssl-default-bind-options`, `ssl-default-bind-ciphers`, ..." => "`min_version` of each bind's TLS", Approximate,
        "rustls offers TLS 1.2 and 1.3 with its own cipher suites; only a minimum version (`ssl-min-ver`) is carried",
        "nothing, unless clients need a protocol rustls does not offer";
    LocalPeer: "global", "`localpeer`" => "stickd's `-L` (the import's `-L` wins)", Translated, "", "";
    OtherGlobal: "global", "`spread-checks`, `ulimit-n`, `cpu-map`, `lua-load`, `server-state-file`, `setenv`, ... (other global settings)" => "", NotTranslated,
        "proxyd has no such setting",
        "see examples/proxyd.toml for the settings proxyd has";
    Tune: "global", "`tune.*`" => "", NotTranslated,
        "proxyd sizes its buffers and queues itself",
        "see examples/proxyd.toml for its limits (`pool_max_idle`, `h2_max_concurrent_streams`, ...)";
    // defaults, frontend, backend, listen
    Listen: "sections", "`listen NAME`" => "a `[[frontend]]` and a `[[backend]]` of that name", Translated, "", "";
    Mode: "proxies", "`mode http`, `mode tcp`" => "`mode` of each `[[frontend]]`", Translated, "", "";
    BackendMode: "proxies", "`mode` of a backend that differs from its frontend's" => "the frontend's mode", Approximate,
        "a proxyd backend takes the mode of the frontend that sends it traffic",
        "give the frontend and its backend the same mode";
    Bind: "proxies", "`bind ADDRESS:PORT`" => "`bind` of the `[[frontend]]`, and the address in fdkeeper's `allowed_binds`", Translated, "", "";
    BindUnsupported: "proxies", "`bind` on a unix socket, `abns@`, `fd@`, a port range or a host name" => "", NotTranslated,
        "fdkeeper binds TCP sockets on an IP address and one port",
        "write one bind per IP address and port";
    BindSsl: "proxies", "`bind ... ssl crt FILE`" => "`bind = [{ address, tls = { certs = [...] } }]`", Translated, "", "";
    BindAlpn: "proxies", "`bind ... alpn h2,http/1.1`" => "`alpn` of the bind's TLS", Translated, "", "";
    BindMinVer: "proxies", "`bind ... ssl-min-ver TLSv1.2`" => "`min_version` of the bind's TLS", Translated, "", "";
    BindParam: "proxies", "other `bind` parameters (`accept-proxy`, `crt-list`, `verify`, `ciphers`, `transparent`, ...)" => "", NotTranslated,
        "proxyd's binds take TLS, ALPN, a minimum version and a backlog only",
        "see README's TLS section for what a bind offers";
    Backlog: "proxies", "`backlog`, `bind ... backlog`" => "`backlog` of the `[[frontend]]`", Translated, "", "";
    Timeout: "proxies", "`timeout connect|client|server|http-request|http-keep-alive|queue|check|tunnel`" => "`timeout_*` in `[defaults]`", Translated, "", "";
    TimeoutPerProxy: "proxies", "a `timeout` of one proxy that differs from the others'" => "one value for every frontend and backend", Approximate,
        "proxyd has one value of each timeout, in `[defaults]`",
        "choose the value every frontend and backend can live with";
    TimeoutZero: "proxies", "`timeout ... 0` (no timeout)" => "", NotTranslated,
        "proxyd has no unlimited timeout: one stuck peer would hold a slot for ever",
        "write a long timeout (proxyd's default is kept)";
    TimeoutOther: "proxies", "`timeout client-fin|server-fin|tarpit`, `contimeout`, ..." => "", NotTranslated,
        "proxyd has no such timeout",
        "nothing: proxyd's half-closes and errors have no separate timeout";
    Maxconn: "proxies", "`maxconn` (defaults, frontend, listen)" => "`maxconn` in `[defaults]` or the `[[frontend]]`", Translated, "", "";
    Fullconn: "proxies", "`maxconn` in a backend, `fullconn`" => "", NotTranslated,
        "proxyd limits connections per frontend and per server only",
        "set `maxconn` on the servers";
    Retries: "proxies", "`retries`" => "`retries` (0 to 10)", Translated, "", "";
    RetriesMax: "proxies", "`retries` above 10" => "`retries = 10`", Approximate,
        "proxyd retries a request at most 10 times",
        "nothing: more retries rarely help";
    Redispatch: "proxies", "`option redispatch`" => "`redispatch = true`", Translated, "", "";
    Httplog: "proxies", "`option httplog`" => "`access_log_format = \"httplog\"` in `[global]`: HAProxy's fields in its order", Translated, "", "";
    LogFormat: "proxies", "`option tcplog`, `option httpslog`, `option clf`, `log-format`" => "proxyd's access log (`access_log_format = \"httplog\"` or `\"json\"`)", Approximate,
        "proxyd writes HAProxy's httplog fields or JSON; other formats are not offered",
        "read the httplog fields (README's access log section) or choose `json`";
    LogProxy: "proxies", "`log ADDRESS FACILITY` in a proxy" => "the one access log of `[global]`", Approximate,
        "proxyd has one access log for every frontend",
        "put the `log` line in `global` and `log global` in the proxies";
    LogGlobal: "proxies", "`log global`" => "the access log", Translated, "", "";
    Dontlognull: "proxies", "`option dontlognull`" => "always: a connection that sends no request leaves no line", Translated, "", "";
    Forwardfor: "proxies", "`option forwardfor [except NET]`" => "`forwardfor = true`, `forwardfor_except`", Translated, "", "";
    ForwardforParam: "proxies", "`option forwardfor header NAME`, `if-none`" => "`X-Forwarded-For`, always added", Approximate,
        "proxyd adds `X-Forwarded-For` under that name only, whatever the request has",
        "have the servers read `X-Forwarded-For`";
    ForwardforFrontend: "proxies", "`option forwardfor` in a frontend" => "`forwardfor` on the frontend's default backend", Approximate,
        "proxyd adds the header per backend",
        "check the backend's other frontends want it too";
    Forwarded: "proxies", "`option forwarded`" => "`forwarded = true`", Translated, "", "";
    ForwardedParam: "proxies", "`option forwarded proto host by for ...`" => "`forwarded = true` (`for`, `proto` and `host`)", Approximate,
        "proxyd always sends `for`, `proto` and `host`, and never `by`",
        "nothing, unless a server needs `by`";
    HttpServerClose: "proxies", "`option http-server-close`, `option httpclose`" => "pooled server connections, keep-alive clients", Approximate,
        "proxyd keeps idle server connections in a pool (as HAProxy's `http-reuse safe`), checked before reuse",
        "nothing; `pool_max_idle = 0` in `[defaults]` opens a connection per request";
    HttpKeepAlive: "proxies", "`option http-keep-alive`" => "always", Translated, "", "";
    Httpchk: "proxies", "`option httpchk [METHOD] [URI]`" => "`[backend.check]` with `type = \"http\"`, `method`, `path`", Translated, "", "";
    HttpchkVersion: "proxies", "`option httpchk METHOD URI VERSION` with a Host header (`HTTP/1.1\\r\\nHost:\\ NAME`), `http-check send [meth M] [uri U] [ver V] [hdr Host NAME]`" => "`host` of `[backend.check]` (proxyd's check is HTTP/1.0 with that Host)", Translated, "", "";
    HttpCheckExpectStatus: "proxies", "`http-check expect status N`" => "`expect_status` of `[backend.check]`", Translated, "", "";
    HttpCheckOther: "proxies", "other `http-check` rules (`expect string`, `rstatus`, `send`, ...)" => "", NotTranslated,
        "proxyd's http check looks at the status only",
        "have the server answer its check URI with the status it means";
    OtherCheck: "proxies", "`option tcp-check`, `ssl-hello-chk`, `mysql-check`, `redis-check`, ..." => "a TCP connect check", Approximate,
        "proxyd checks with a TCP connect or an HTTP request",
        "use an HTTP check URI on the server if it has one";
    Balance: "proxies", "`balance roundrobin|leastconn|source|random`, `balance uri [whole] [depth N]`, `balance hdr(NAME)`" => "`balance` (`{ type = \"uri\", whole, depth }` for uri's options)", Translated, "", "";
    BalanceOther: "proxies", "`balance static-rr|first|url_param|rdp-cookie`, `uri len N`, `hdr(NAME) use_domain_only`, `random draws N`, `uri`/`hdr` behind a tcp frontend" => "`balance = \"roundrobin\"`, or the algorithm without that option", Approximate,
        "proxyd balances with roundrobin, leastconn, source, random (2 draws), uri (path, query, depth) or hdr (the whole field)",
        "pick the algorithm that comes closest";
    DefaultBackend: "proxies", "`default_backend`" => "`default_backend`", Translated, "", "";
    NoDefaultBackend: "proxies", "a frontend without a usable `default_backend`" => "", NotTranslated,
        "every proxyd frontend sends its traffic to one default backend",
        "give the frontend a `default_backend` with servers";
    DefaultServer: "proxies", "`default-server`" => "its parameters on every `server` of the backend", Translated, "", "";
    Server: "proxies", "`server NAME IP:PORT check rise fall inter maxconn weight`" => "`[[backend.server]]` with `check`, `rise`, `fall`, `inter`, `maxconn`, `weight`", Translated, "", "";
    ServerBackup: "proxies", "`server ... backup`" => "", NotTranslated,
        "proxyd has no backup servers: the server is left out",
        "add it as a server, set to `maint` with `proxyd.v1.Admin/SetServer` until needed";
    ServerDisabled: "proxies", "`server ... disabled`" => "", NotTranslated,
        "the server is left out",
        "add it, then set it to `maint` with `proxyd.v1.Admin/SetServer`";
    ServerAddress: "proxies", "`server` without a port, with a port offset, or on a unix socket" => "", NotTranslated,
        "a proxyd server is an IP address or a DNS name, and a port: the server is left out",
        "write its address or name and its port";
    ServerName: "proxies", "`server NAME HOST:PORT resolvers R resolve-prefer ipv4`" => "`address = \"HOST:PORT\"`, the backend's `resolvers` and `resolve_interval` (`timeout resolve` of R)", Translated, "", "";
    ServerNameOther: "proxies", "`server` by name without `resolvers`, without `resolve-prefer ipv4`, or on other `resolvers` than the backend's first named server" => "`address = \"HOST:PORT\"`", Approximate,
        "proxyd resolves every name again each `resolve_interval`, through its backend's one `[[resolvers]]` (or the system's resolver), and takes an IPv4 address first; HAProxy without `resolvers` resolves only at start, and prefers IPv6",
        "nothing, unless a name must stay at its first address or use IPv6";
    PoolPurgeDelay: "proxies", "`pool-purge-delay` (`server`, `default-server`)" => "`pool_purge_delay` in `[defaults]`", Translated, "", "";
    PoolPurgeDelayPerServer: "proxies", "a `pool-purge-delay` that differs between servers" => "one value for every server", Approximate,
        "proxyd has one `pool_purge_delay`, in `[defaults]`",
        "choose the value every server can live with";
    ServerSsl: "proxies", "`server ... ssl`" => "a plain connection", Approximate,
        "proxyd speaks plain HTTP or TCP to servers",
        "have the server also listen without TLS, or keep HAProxy in front of it";
    ServerParam: "proxies", "other `server` parameters (`fastinter`, `slowstart`, `send-proxy`, `agent-check`, `cookie`, ...)" => "", NotTranslated,
        "proxyd's servers take check, rise, fall, inter, maxconn and weight only",
        "see examples/proxyd.toml";
    NoServer: "proxies", "a backend without a usable server" => "", NotTranslated,
        "a proxyd backend needs at least one server: the backend is left out",
        "add a server with an IP address and a port";
    StickTable: "proxies", "`stick-table type ip|ipv6|integer|string [len N] size N expire T peers P`" => "a `[[tables]]` of stickd.toml, named after the backend", Translated, "", "";
    StickTableParam: "proxies", "`stick-table ... store`, `nopurge`, `srvkey`, `write-to`, `type binary`" => "", NotTranslated,
        "stickd's tables keep a key and a server name with an expiry",
        "track counters (rates, gpc) in HAProxy until proxyd has rules for them";
    StickTableNoExpire: "proxies", "`stick-table` without `expire`" => "`expire = \"24h\"`", Approximate,
        "every stickd entry expires",
        "choose the longest a session may stay idle";
    StickTableUnused: "proxies", "a `stick-table` that no stick rule uses (`track-sc` counters)" => "", NotTranslated,
        "stickd's tables serve stick rules only",
        "nothing, unless a rule of a translated backend uses it";
    StickOn: "proxies", "`stick on req.cook(NAME)`, `stick on src`" => "`[backend.stick]` with `on`", Translated, "", "";
    StickMatchStore: "proxies", "`stick match` and `stick store-request` on one fetch" => "`on` of `[backend.stick]`", Translated, "", "";
    StickMatchOnly: "proxies", "`stick match` or `stick store-request` alone" => "`on` (matches and stores)", Approximate,
        "proxyd's `on` both looks the key up and stores it for a new session",
        "nothing, unless the table must only be read or only written";
    StickStoreResponse: "proxies", "`stick store-response res.cook(NAME)`" => "`store_response` of `[backend.stick]`", Translated, "", "";
    StickOther: "proxies", "stick rules on other fetches, with `if`/`unless`, or a second rule" => "", NotTranslated,
        "proxyd's stick rule is one key from a request cookie or the client address, and one response cookie",
        "key the stickiness on a cookie or the client address";
    Acl: "proxies", "`acl NAME FETCH [-i] [-m str|beg|end|sub|reg|found] VALUES` on `path`, `path_beg`, `path_end`, `path_sub`, `path_reg`, `hdr(NAME)` and `req.hdr(NAME)` (`hdr_beg`, `hdr_end`, `hdr_sub`), `req.fhdr(NAME)`, `method`, `src`, `ssl_fc`; conditions of ACL names, `!`, `||` and `{ ... }`; `TRUE`, `FALSE`, `HTTP`, `LOCALHOST`, `METH_*`" => "the `when` of a `[[frontend.rule]]`: `path`, `path_prefix`, `path_regex`, `method`, `src`, `tls`, `header` (a regex that splits the field at commas as HAProxy does), `all`, `any`, `not`", Translated, "", "";
    AclOther: "proxies", "an `acl` on another fetch or match (`hdr_dom`, `hdr_reg`, `req.cook`, `url_param`, `-f FILE`, `-i` on `method` or a regex, a regex with syntax only PCRE has), an `acl` outside a frontend" => "", NotTranslated,
        "the import writes a condition only where proxyd's matches exactly the requests HAProxy's does; the rules that use the ACL are left out too",
        "write the `when` of those rules by hand (README, \"L7 rules\": host, path, method, header, cookie, query, src, tls)";
    UseBackend: "proxies", "`use_backend NAME [if|unless COND]`" => "a `[[frontend.rule]]` with `use_backend`, after the rules of `http-request` and `redirect` as HAProxy runs them", Translated, "", "";
    UseBackendOther: "proxies", "`use_backend` to a backend that is not translated, or named by an expression (`%[...]`)" => "", NotTranslated,
        "proxyd's `use_backend` names one backend of proxyd.toml",
        "translate the backend, or write one rule per backend the expression can name";
    UseServer: "proxies", "`use-server`" => "", NotTranslated,
        "proxyd's rules choose a backend, not a server",
        "a backend of that one server, chosen by a `[[frontend.rule]]`";
    HttpRequest: "proxies", "`http-request redirect location|prefix V [code N] [drop-query]`, `redirect ...`, `http-request deny [deny_status N]`, `http-request set-header|add-header|del-header NAME [VALUE]` with a value written out" => "a `[[frontend.rule]]` with `redirect`, `deny`, `set_header`, `add_header` or `del_header`", Translated, "", "";
    RedirectScheme: "proxies", "`http-request redirect scheme S`, `redirect scheme S`" => "a `[[frontend.rule]]` with `redirect = { scheme = S }`", Approximate,
        "a request without Host (HTTP/1.0) gets a 400 from proxyd; HAProxy redirects it to `S:///PATH`, which no client can follow",
        "nothing";
    HttpRulesOther: "proxies", "other `http-request` actions (`allow`, `tarpit`, `auth`, `return`, `set-path`, `set-var`, `track-sc*`, ...), a log-format value (`%[...]`), a redirect's `append-slash` or `set-cookie`, a prefix ending in `/`, a header proxyd writes itself (`Host`, `Connection`, ...), rules outside a frontend or in tcp mode, `reqadd`/`rspadd`..." => "", NotTranslated,
        "proxyd's rules redirect, deny, return, set the path and set, add or delete headers with fixed values, in http frontends",
        "write it as a `[[frontend.rule]]` by hand if proxyd's actions cover it (README, \"L7 rules\")";
    RuleAfterUntranslated: "proxies", "a rule after one that is not translated and could have stopped the request (`deny`, `allow`, `use_backend`, ...)" => "", NotTranslated,
        "written alone, it would act on requests that HAProxy stops at the earlier rule",
        "translate the earlier rule by hand, then this one";
    RuleReadsRewrite: "proxies", "a condition on a header, the path or the method that an earlier `http-request` rule rewrites" => "", NotTranslated,
        "proxyd's conditions see the request as the client sent it, HAProxy's as the rules before have rewritten it",
        "test what the client sent, or rewrite after the rules that read it";
    HttpResponse: "proxies", "`http-response set-header|add-header|del-header` without condition" => "a `[[frontend.rule]]` with `set_response_header`, `add_response_header` or `del_response_header`", Approximate,
        "proxyd edits its own answers too (redirects, denials, errors), HAProxy only the servers'",
        "nothing, unless proxyd's own answers must not carry it";
    HttpAfterResponse: "proxies", "`http-after-response set-header|add-header|del-header` without condition" => "a `[[frontend.rule]]` with `set_response_header`, `add_response_header` or `del_response_header`", Translated, "", "";
    HttpResponseOther: "proxies", "other `http-response` and `http-after-response` rules, and any with a condition" => "", NotTranslated,
        "proxyd's response rules set, add or delete a header with a fixed value on every answer",
        "set the header in the servers, or without condition";
    TcpRules: "proxies", "`tcp-request`, `tcp-response`, `track-sc*`" => "", NotTranslated,
        "proxyd has no tcp rules or counters",
        "rate-limit in front of proxyd (nftables) or in the servers";
    Cookie: "proxies", "`cookie NAME [insert] [indirect] [nocache] [httponly] [secure] [domain D]`, `server ... cookie VALUE`" => "`cookie = { name, insert, indirect, ... }` of the `[[backend]]`, `cookie` of each server", Translated, "", "";
    CookieMaxlife: "proxies", "`cookie ... maxlife T`" => "`max_age` of the backend's `cookie`", Approximate,
        "proxyd asks the browser to drop the cookie after T (`Max-Age`); HAProxy dates the cookie and ignores an older one itself",
        "nothing, unless clients keep cookies past their Max-Age";
    CookieOther: "proxies", "`cookie NAME rewrite|prefix`, `preserve`, `postonly`, `maxidle`, `dynamic`, `attr`, a second `domain`, `appsession`" => "", NotTranslated,
        "proxyd inserts its own cookie or reads the servers' as they set it; it does not rewrite or prefix theirs",
        "use `cookie NAME insert`, or stick on the application's session cookie (`stick on req.cook(NAME)`)";
    StatsPage: "proxies", "`stats enable`, `stats uri`, ... (the stats page)" => "Prometheus `/metrics` (`metrics` in `[global]`)", Approximate,
        "proxyd has no HTML stats page: its master serves `/metrics`",
        "scrape `/metrics`; `proxyd status` and grpcurl show the servers";
    HttpReuse: "proxies", "`http-reuse`" => "pooled server connections, checked before reuse", Approximate,
        "proxyd always reuses idle server connections of the same server",
        "`pool_max_idle = 0` in `[defaults]` never reuses";
    Errors: "proxies", "`errorfile`, `errorloc`, `http-error`" => "", NotTranslated,
        "proxyd answers its own errors with a short fixed body",
        "nothing, unless clients read the error pages";
    OtherProxy: "proxies", "`compression`, `capture`, `monitor-uri`, `http-reuse never`, `option` others" => "", NotTranslated,
        "proxyd has no equivalent",
        "see examples/proxyd.toml for what proxyd offers";
    // peers
    Peers: "peers", "`peers NAME` with `peer NAME IP:PORT`" => "`[[peers]]` of stickd.toml; the local one by `-L` (stickd's `-L` in its drop-in)", Translated, "", "";
    PeersOther: "peers", "a second `peers` section, `bind`/`default-server`/`disabled` in one, a table without `peers` next to replicated ones" => "", Approximate,
        "stickd has one set of peers and replicates every table to all of them",
        "give every table the same peers section";
    // anything else
    Resolvers: "sections", "`resolvers NAME` with `nameserver`, `timeout resolve`, `timeout retry`" => "a `[[resolvers]]` (`nameservers`, `timeout`), `timeout resolve` as the `resolve_interval` of the backends that use it", Translated, "", "";
    ResolversOther: "sections", "`hold`, `resolve_retries`, `accepted_payload_size`, `parse-resolv-conf` in `resolvers`" => "", Approximate,
        "proxyd asks each nameserver once a round and keeps a server's last address until a round answers another",
        "nothing; list the nameservers with `nameserver` rather than `parse-resolv-conf`";
    ResolversUnused: "sections", "a `resolvers` section no translated server resolves through" => "", NotTranslated,
        "nothing written refers to it",
        "nothing, unless a server left out should use it";
    OtherSection: "sections", "`userlist`, `mailers`, `program`, `http-errors`, `ring`, `cache`, ..." => "", NotTranslated,
        "proxyd has no equivalent: the whole section is left out",
        "see what it was used for; nothing in the written files refers to it";
    Orphan: "sections", "a line before any section" => "", NotTranslated,
        "HAProxy refuses it too",
        "move it into its section";
    Unknown: "any", "anything else" => "", NotTranslated,
        "the import does not know this directive",
        "look up what it does in HAProxy's documentation and whether proxyd needs it";
}

impl Topic {
    /// The docs' table: one row per topic, generated so that the page cannot drift.
    pub fn markdown_table() -> String {
        let mut out = String::from(
            "| section | HAProxy | here | translated | why, and what to do instead |\n|---|---|---|---|---|\n",
        );
        for t in Topic::ALL {
            let i = t.info();
            let why = match (i.why, i.instead) {
                ("", _) => String::new(),
                (w, "") => w.to_owned(),
                (w, d) => format!("{w}; instead: {d}"),
            };
            let ours = if i.ours.is_empty() { "—" } else { i.ours };
            // A pipe splits a table cell, even inside a code span.
            let cell = |s: &str| s.replace('|', "\\|");
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                i.section,
                cell(i.haproxy),
                cell(ours),
                i.fate.as_str(),
                cell(&why)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_that_is_not_translated_says_why_and_what_to_do() {
        for t in Topic::ALL {
            let i = t.info();
            match i.fate {
                Fate::Translated => {
                    assert!(i.why.is_empty() && i.instead.is_empty(), "{t:?}");
                    assert!(!i.ours.is_empty(), "{t:?}");
                }
                _ => assert!(!i.why.is_empty() && !i.instead.is_empty(), "{t:?}"),
            }
        }
    }
}
