/*
 * flux_plugin.h - single-header C SDK for flux-edge WebAssembly plugins, ABI v1
 * (docs/plugin-abi.md). Freestanding: no libc, no WASI.
 *
 *   clang-14 --target=wasm32 -O2 -nostdlib -ffreestanding \
 *       -Wl,--no-entry -Wl,--strip-all -o my_plugin.wasm my_plugin.c
 *
 * A plugin includes this header in exactly one .c file and defines two functions:
 *
 *   int  flux_plugin_init(const char *config, uint32_t len);       // 0 = accept the config
 *   void flux_plugin_process(const flux_msg *msg, flux_out *out);  // called once per message
 *
 * The header provides the five exports of the ABI (flux_abi_version, flux_alloc, flux_dealloc,
 * flux_init, flux_process), loops over each batch and collects the JSON Lines output in a
 * buffer it reuses between calls. Other .c files of the same plugin may include it after
 * `#define FLUX_PLUGIN_DECLARATIONS_ONLY`.
 *
 * What is in here:
 *   - allocator: first-fit free list over __heap_base, growing memory with memory.grow;
 *     8-byte aligned blocks; size 0 gets a real block; 0 is returned when memory cannot grow.
 *   - messages: flux_msg (kind, function, address, ts, device, topic, payload),
 *     flux_msg_register_count / flux_msg_register for kind-1 words.
 *   - output: flux_out_f64 / _i64 / _bool / _str / _measurement_ex / _error. Strings are
 *     JSON-escaped (quotes, backslash, control characters) and invalid UTF-8 is replaced by
 *     U+FFFD. A non-finite value or ts, or a line over 64 KiB, becomes an error line.
 *   - numbers: doubles are written with 15 significant digits (trailing zeros dropped, always a
 *     '.' or an exponent so they stay floats in JSON: 21.0, 0.1, 1e+21 as "1.0e21"): a decimal
 *     of up to 15 significant digits prints back as itself (any normal double; the scaling does
 *     at most three roundings), and the relative error is at most about 5e-15, half a unit in
 *     the 15th digit (tested < 1e-14 over the whole double range, subnormals included). Not
 *     the shortest round-trip form (that needs up to 17 digits): 0.1 + 0.2 prints as 0.3.
 *   - flux_text: bounded string building (names, log messages) with the same formatters.
 *   - config: flux_cfg_number / _bool / _string / _has look up a dotted key path
 *     ("scale", "source.name") in the JSON config. No full JSON DOM.
 *   - logging: flux_log_trace .. flux_log_error (host imports flux.log_*; only the ones you
 *     call are imported). Each call is a trip through the host: not per message at info+.
 */
#ifndef FLUX_PLUGIN_H
#define FLUX_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#define FLUX_ABI_VERSION 1
#define FLUX_MAX_LINE 65536u

#define FLUX_KIND_BYTES 0
#define FLUX_KIND_REGISTERS 1
#define FLUX_KIND_MEASUREMENT 2

#define FLUX_FN_COIL 1
#define FLUX_FN_DISCRETE 2
#define FLUX_FN_HOLDING 3
#define FLUX_FN_INPUT 4

#define FLUX_EXPORT(name) __attribute__((export_name(name)))
#define FLUX_IMPORT(name) __attribute__((import_module("flux"), import_name(name)))

typedef struct flux_msg {
    uint32_t index;        /* position in the batch: the "i" of every output line about it */
    uint8_t kind;          /* FLUX_KIND_* */
    uint8_t function;      /* Modbus function code or 0 */
    uint16_t address;      /* first register address (kind 1) or 0 */
    double ts;             /* unix seconds when received */
    const char *device;    /* UTF-8, NOT NUL-terminated: use device_len */
    uint32_t device_len;
    const char *topic;     /* UTF-8, NOT NUL-terminated: use topic_len */
    uint32_t topic_len;
    const uint8_t *payload;
    uint32_t payload_len;
} flux_msg;

typedef struct flux_out {
    uint32_t index;        /* the input message these lines are about */
    uint32_t lines;        /* lines written for it so far */
} flux_out;

typedef enum { FLUX_GOOD = 0, FLUX_STALE = 1, FLUX_BAD = 2 } flux_quality;

typedef enum { FLUX_F64, FLUX_I64, FLUX_BOOL, FLUX_STR } flux_value_type;

typedef struct flux_value {
    flux_value_type type;
    double f;
    int64_t i;             /* FLUX_I64, and FLUX_BOOL (0/1) */
    const char *s;         /* FLUX_STR: s_len bytes */
    uint32_t s_len;
} flux_value;

typedef struct flux_text {
    char *data;            /* always NUL-terminated */
    uint32_t len, cap;     /* writes beyond cap-1 bytes are dropped */
} flux_text;

/* ---- what the plugin defines ------------------------------------------------------------- */
int flux_plugin_init(const char *config, uint32_t len);
void flux_plugin_process(const flux_msg *msg, flux_out *out);

/* ---- API ------------------------------------------------------------------------------------ */
void *flux_alloc(uint32_t size);
void flux_dealloc(void *ptr, uint32_t size);

uint32_t flux_strlen(const char *s);
static inline uint32_t flux_msg_register_count(const flux_msg *m) { return m->payload_len / 2; }
static inline uint16_t flux_msg_register(const flux_msg *m, uint32_t i) {
    return (uint16_t)(m->payload[2 * i] | (m->payload[2 * i + 1] << 8));
}

static inline flux_value flux_f64(double v) { flux_value x = {FLUX_F64, v, 0, 0, 0}; return x; }
static inline flux_value flux_i64(int64_t v) { flux_value x = {FLUX_I64, 0, v, 0, 0}; return x; }
static inline flux_value flux_bool(int v) { flux_value x = {FLUX_BOOL, 0, v ? 1 : 0, 0, 0}; return x; }
static inline flux_value flux_strn(const char *s, uint32_t n) { flux_value x = {FLUX_STR, 0, 0, s, n}; return x; }
static inline flux_value flux_str(const char *s) { return flux_strn(s, flux_strlen(s)); }

/* device: NULL = the message's; ts: NULL = the message's. name/unit/device: NUL-terminated. */
void flux_out_measurement_ex(flux_out *out, const char *name, flux_value value, const char *unit,
                             flux_quality quality, const char *device, const double *ts);
static inline void flux_out_f64(flux_out *o, const char *name, double v, const char *unit) {
    flux_out_measurement_ex(o, name, flux_f64(v), unit, FLUX_GOOD, 0, 0);
}
static inline void flux_out_i64(flux_out *o, const char *name, int64_t v, const char *unit) {
    flux_out_measurement_ex(o, name, flux_i64(v), unit, FLUX_GOOD, 0, 0);
}
static inline void flux_out_bool(flux_out *o, const char *name, int v) {
    flux_out_measurement_ex(o, name, flux_bool(v), "", FLUX_GOOD, 0, 0);
}
static inline void flux_out_str(flux_out *o, const char *name, const char *v) {
    flux_out_measurement_ex(o, name, flux_str(v), "", FLUX_GOOD, 0, 0);
}
/* An error line: the host turns it into an error record for this message. */
void flux_out_error(flux_out *out, const char *message);

static inline flux_text flux_text_on(char *storage, uint32_t cap) {
    flux_text t = {storage, 0, cap};
    if (cap) storage[0] = 0;
    return t;
}
void flux_text_strn(flux_text *t, const char *s, uint32_t n);
void flux_text_str(flux_text *t, const char *s);
void flux_text_i64(flux_text *t, int64_t v);
void flux_text_f64(flux_text *t, double v);   /* "nan"/"inf"/"-inf" for non-finite values */
/* The formatters write into buf (>= 32 bytes) and return the length; flux_format_f64 returns
 * 0 for a non-finite value. */
uint32_t flux_format_i64(char *buf, int64_t v);
uint32_t flux_format_f64(char *buf, double v);

/* Config lookups by dotted path ("scale", "source.registers"). Return 1 if found with the right
 * type, else 0 (and leave *out untouched). flux_cfg_string unescapes into dst (cap bytes,
 * NUL-terminated, truncated if needed) and returns the unescaped length or -1. */
int flux_cfg_has(const char *cfg, uint32_t len, const char *path);
int flux_cfg_number(const char *cfg, uint32_t len, const char *path, double *out);
int flux_cfg_bool(const char *cfg, uint32_t len, const char *path, int *out);
int32_t flux_cfg_string(const char *cfg, uint32_t len, const char *path, char *dst, uint32_t cap);

FLUX_IMPORT("log_trace") void flux__log_trace(const char *ptr, uint32_t len);
FLUX_IMPORT("log_debug") void flux__log_debug(const char *ptr, uint32_t len);
FLUX_IMPORT("log_info") void flux__log_info(const char *ptr, uint32_t len);
FLUX_IMPORT("log_warn") void flux__log_warn(const char *ptr, uint32_t len);
FLUX_IMPORT("log_error") void flux__log_error(const char *ptr, uint32_t len);
static inline void flux_log_trace(const char *m) { flux__log_trace(m, flux_strlen(m)); }
static inline void flux_log_debug(const char *m) { flux__log_debug(m, flux_strlen(m)); }
static inline void flux_log_info(const char *m) { flux__log_info(m, flux_strlen(m)); }
static inline void flux_log_warn(const char *m) { flux__log_warn(m, flux_strlen(m)); }
static inline void flux_log_error(const char *m) { flux__log_error(m, flux_strlen(m)); }

#ifndef FLUX_PLUGIN_DECLARATIONS_ONLY
/* ============================================================================================ */
/* Implementation                                                                               */
/* ============================================================================================ */

/* The compiler may emit calls to these for struct copies and loops. */
__attribute__((weak)) void *memcpy(void *dst, const void *src, size_t n) {
    unsigned char *d = (unsigned char *)dst;
    const unsigned char *s = (const unsigned char *)src;
    while (n--) *d++ = *s++;
    return dst;
}
__attribute__((weak)) void *memmove(void *dst, const void *src, size_t n) {
    unsigned char *d = (unsigned char *)dst;
    const unsigned char *s = (const unsigned char *)src;
    if (d < s) {
        while (n--) *d++ = *s++;
    } else {
        while (n--) d[n] = s[n];
    }
    return dst;
}
__attribute__((weak)) void *memset(void *dst, int c, size_t n) {
    unsigned char *d = (unsigned char *)dst;
    while (n--) *d++ = (unsigned char)c;
    return dst;
}

uint32_t flux_strlen(const char *s) {
    uint32_t n = 0;
    if (!s) return 0;
    while (s[n]) n++;
    return n;
}

/* ---- allocator ------------------------------------------------------------------------------ */
/* Blocks: an 8-byte header {size, magic} followed by `size` bytes (a multiple of 8). Freed blocks
 * go on a first-fit free list (split when the rest is worth keeping); a block freed at the top
 * of the heap lowers the top instead. */
extern unsigned char __heap_base;

typedef struct flux__block {
    uint32_t size;
    uint32_t magic;
} flux__block;
typedef struct flux__free {
    flux__block hdr;
    struct flux__free *next;
} flux__free;

#define FLUX__MAGIC_USED 0xF1A5u
#define FLUX__MAGIC_FREE 0xF2EEu

static uintptr_t flux__top;
static flux__free *flux__free_list;

static int flux__ensure(uintptr_t end) {
    uintptr_t have = (uintptr_t)__builtin_wasm_memory_size(0) * 65536u;
    if (end <= have) return 1;
    uintptr_t pages = (end - have + 65535u) / 65536u;
    return __builtin_wasm_memory_grow(0, pages) != (size_t)-1;
}

FLUX_EXPORT("flux_alloc") void *flux_alloc(uint32_t size) {
    if (size > 0x7FFFFFF0u) return 0;
    uint32_t need = (size + 7u) & ~7u;
    if (need < 8) need = 8;
    flux__free **link = &flux__free_list;
    for (flux__free *f = flux__free_list; f; link = &f->next, f = f->next) {
        if (f->hdr.size < need) continue;
        *link = f->next;
        if (f->hdr.size - need >= 32) { /* split: keep the tail free */
            flux__free *rest = (flux__free *)((unsigned char *)f + sizeof(flux__block) + need);
            rest->hdr.size = f->hdr.size - need - (uint32_t)sizeof(flux__block);
            rest->hdr.magic = FLUX__MAGIC_FREE;
            rest->next = *link;
            *link = rest;
            f->hdr.size = need;
        }
        f->hdr.magic = FLUX__MAGIC_USED;
        return (unsigned char *)f + sizeof(flux__block);
    }
    if (!flux__top) flux__top = ((uintptr_t)&__heap_base + 7u) & ~(uintptr_t)7u;
    uintptr_t end = flux__top + sizeof(flux__block) + need;
    if (end < flux__top || !flux__ensure(end)) return 0;
    flux__block *b = (flux__block *)flux__top;
    b->size = need;
    b->magic = FLUX__MAGIC_USED;
    flux__top = end;
    return (unsigned char *)b + sizeof(flux__block);
}

FLUX_EXPORT("flux_dealloc") void flux_dealloc(void *ptr, uint32_t size) {
    (void)size; /* the header knows */
    if (!ptr) return;
    flux__block *b = (flux__block *)((unsigned char *)ptr - sizeof(flux__block));
    if (b->magic != FLUX__MAGIC_USED) __builtin_trap(); /* double free or foreign pointer */
    if ((uintptr_t)ptr + b->size == flux__top) {
        flux__top = (uintptr_t)b;
        b->magic = 0;
        return;
    }
    flux__free *f = (flux__free *)b;
    f->hdr.magic = FLUX__MAGIC_FREE;
    f->next = flux__free_list;
    flux__free_list = f;
}

/* ---- number formatting ---------------------------------------------------------------------- */
uint32_t flux_format_i64(char *buf, int64_t v) {
    char tmp[24];
    uint32_t n = 0, len = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0) buf[len++] = '-';
    while (n) buf[len++] = tmp[--n];
    buf[len] = 0;
    return len;
}

static const double flux__pow10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                       1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                       1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* 10^(16j), correctly rounded by the compiler (exact up to 1e16). */
static const double flux__pow10_16[20] = {1e0,   1e16,  1e32,  1e48,  1e64,  1e80,  1e96,
                                          1e112, 1e128, 1e144, 1e160, 1e176, 1e192, 1e208,
                                          1e224, 1e240, 1e256, 1e272, 1e288, 1e304};

/* v * 10^k with at most three roundings for |k| <= 319 (an exact 10^(k mod 16), then the
 * correctly rounded 10^(16j)); one more per 16 beyond that, which only the smallest doubles
 * need. */
static double flux__scale10(double v, int k) {
    int neg = k < 0;
    unsigned a = neg ? (unsigned)-k : (unsigned)k;
    while (a > 319) {
        v = neg ? v / 1e16 : v * 1e16;
        a -= 16;
    }
    if (neg) return v / flux__pow10[a % 16] / flux__pow10_16[a / 16];
    return v * flux__pow10[a % 16] * flux__pow10_16[a / 16];
}

#define FLUX__DIGITS 15

uint32_t flux_format_f64(char *buf, double v) {
    uint32_t len = 0;
    if (v != v || v - v != 0) { buf[0] = 0; return 0; } /* NaN or inf */
    if (v < 0 || (v == 0 && 1 / v < 0)) { buf[len++] = '-'; v = -v; }
    if (v == 0) { buf[len++] = '0'; buf[len++] = '.'; buf[len++] = '0'; buf[len] = 0; return len; }
    /* decimal exponent estimate, then a 17-digit integer n = v * 10^(16-e) in [1e16, 1e17) */
    int e = 0;
    double s = v;
    while (s >= 1e16) { s /= 1e16; e += 16; }
    while (s >= 10) { s /= 10; e += 1; }
    while (s < 1e-16) { s *= 1e16; e -= 16; }
    while (s < 1) { s *= 10; e -= 1; }
    double scaled = flux__scale10(v, 16 - e);
    if (scaled >= 1e17) { e += 1; scaled = flux__scale10(v, 16 - e); }
    if (scaled < 1e16) { e -= 1; scaled = flux__scale10(v, 16 - e); }
    uint64_t n = (uint64_t)(scaled + 0.5);
    /* round to FLUX__DIGITS significant digits */
    uint64_t q = (n + 50) / 100;
    if (q >= 1000000000000000ull) { q /= 10; e += 1; }
    /* 15 digits of DBL_MAX round up past it; readers would see inf: round down there. */
    if (e == 308 && q > 179769313486231ull) q = 179769313486231ull;
    char d[FLUX__DIGITS];
    int nd = FLUX__DIGITS;
    for (int i = FLUX__DIGITS - 1; i >= 0; i--) { d[i] = (char)('0' + q % 10); q /= 10; }
    while (nd > 1 && d[nd - 1] == '0') nd--;
    if (e >= -5 && e < FLUX__DIGITS) {
        if (e < 0) {
            buf[len++] = '0';
            buf[len++] = '.';
            for (int i = -1; i > e; i--) buf[len++] = '0';
            for (int i = 0; i < nd; i++) buf[len++] = d[i];
        } else {
            for (int i = 0; i <= e; i++) buf[len++] = i < nd ? d[i] : '0';
            buf[len++] = '.';
            if (nd > e + 1) {
                for (int i = e + 1; i < nd; i++) buf[len++] = d[i];
            } else {
                buf[len++] = '0';
            }
        }
    } else {
        buf[len++] = d[0];
        buf[len++] = '.';
        if (nd > 1) {
            for (int i = 1; i < nd; i++) buf[len++] = d[i];
        } else {
            buf[len++] = '0';
        }
        buf[len++] = 'e';
        len += flux_format_i64(buf + len, e);
    }
    buf[len] = 0;
    return len;
}

/* ---- flux_text ------------------------------------------------------------------------------ */
void flux_text_strn(flux_text *t, const char *s, uint32_t n) {
    if (!t->cap) return;
    for (uint32_t i = 0; i < n && t->len + 1 < t->cap; i++) t->data[t->len++] = s[i];
    t->data[t->len] = 0;
}
void flux_text_str(flux_text *t, const char *s) { flux_text_strn(t, s, flux_strlen(s)); }
void flux_text_i64(flux_text *t, int64_t v) {
    char b[32];
    flux_text_strn(t, b, flux_format_i64(b, v));
}
void flux_text_f64(flux_text *t, double v) {
    char b[40];
    uint32_t n = flux_format_f64(b, v);
    if (n) flux_text_strn(t, b, n);
    else flux_text_str(t, v != v ? "nan" : v < 0 ? "-inf" : "inf");
}

/* ---- output buffer -------------------------------------------------------------------------- */
static unsigned char *flux__out;
static uint32_t flux__out_len, flux__out_cap;
static int flux__out_oom;

static int flux__reserve(uint32_t extra) {
    if (flux__out_oom) return 0;
    if (flux__out_len + extra <= flux__out_cap && flux__out_len + extra >= flux__out_len) return 1;
    uint32_t cap = flux__out_cap ? flux__out_cap : 4096;
    while (cap < flux__out_len + extra) {
        if (cap > 0x40000000u) { flux__out_oom = 1; return 0; }
        cap *= 2;
    }
    unsigned char *p = (unsigned char *)flux_alloc(cap);
    if (!p) { flux__out_oom = 1; return 0; }
    memcpy(p, flux__out, flux__out_len);
    if (flux__out) flux_dealloc(flux__out, flux__out_cap);
    flux__out = p;
    flux__out_cap = cap;
    return 1;
}

static void flux__put(const char *s, uint32_t n) {
    if (!flux__reserve(n)) return;
    memcpy(flux__out + flux__out_len, s, n);
    flux__out_len += n;
}
static void flux__puts(const char *s) { flux__put(s, flux_strlen(s)); }

/* Length of the valid UTF-8 sequence at s (n bytes available), 0 if invalid. */
static uint32_t flux__utf8_len(const unsigned char *s, uint32_t n) {
    unsigned char c = s[0];
    uint32_t len;
    uint32_t cp;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; }
    else return 0;
    if (n < len) return 0;
    for (uint32_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0;
    return len;
}

/* The body of a JSON string (no quotes). */
static void flux__put_json_body(const char *str, uint32_t n) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str;
    uint32_t start = 0, i = 0;
    while (i < n) {
        unsigned char c = s[i];
        const char *esc = 0;
        char u[6];
        uint32_t ulen = 0;
        if (c == '"') esc = "\\\"";
        else if (c == '\\') esc = "\\\\";
        else if (c == '\n') esc = "\\n";
        else if (c == '\r') esc = "\\r";
        else if (c == '\t') esc = "\\t";
        else if (c == 0x08) esc = "\\b";
        else if (c == 0x0C) esc = "\\f";
        else if (c < 0x20) {
            u[0] = '\\'; u[1] = 'u'; u[2] = '0'; u[3] = '0';
            u[4] = hex[c >> 4]; u[5] = hex[c & 15];
            ulen = 6;
        } else if (c >= 0x80) {
            uint32_t l = flux__utf8_len(s + i, n - i);
            if (l) { i += l; continue; }
            esc = "\xEF\xBF\xBD"; /* U+FFFD for an invalid byte */
        } else {
            i++;
            continue;
        }
        flux__put((const char *)s + start, i - start);
        if (esc) flux__puts(esc);
        else flux__put(u, ulen);
        i++;
        start = i;
    }
    flux__put((const char *)s + start, n - start);
}

static void flux__put_json_str(const char *str, uint32_t n) {
    flux__put("\"", 1);
    flux__put_json_body(str, n);
    flux__put("\"", 1);
}

static void flux__begin(flux_out *out) {
    char b[32];
    out->lines++;
    flux__puts("{\"i\":");
    flux__put(b, flux_format_i64(b, out->index));
}

void flux_out_error(flux_out *out, const char *message) {
    uint32_t n = flux_strlen(message);
    const uint32_t cap = FLUX_MAX_LINE / 6 - 32; /* escaping can at most sextuple a byte */
    int cut = n > cap;
    if (cut) { /* cut on a character boundary */
        n = cap;
        while (n > 0 && ((unsigned char)message[n] & 0xC0) == 0x80) n--;
    }
    flux__begin(out);
    flux__puts(",\"error\":\"");
    flux__put_json_body(message, n);
    if (cut) flux__puts("\xE2\x80\xA6[truncated]");
    flux__puts("\"}\n");
}

static void flux__error_about(flux_out *out, const char *name, const char *what, double v) {
    char b[200];
    flux_text t = flux_text_on(b, sizeof b);
    flux_text_str(&t, "measurement \"");
    flux_text_str(&t, name);
    flux_text_str(&t, "\": ");
    flux_text_str(&t, what);
    flux_text_str(&t, " ");
    flux_text_f64(&t, v);
    flux_text_str(&t, " is not a finite number (JSON cannot carry it)");
    flux_out_error(out, b);
}

void flux_out_measurement_ex(flux_out *out, const char *name, flux_value value, const char *unit,
                             flux_quality quality, const char *device, const double *ts) {
    char b[40];
    if (value.type == FLUX_F64 && !flux_format_f64(b, value.f)) {
        flux__error_about(out, name, "value", value.f);
        return;
    }
    if (ts && !flux_format_f64(b, *ts)) {
        flux__error_about(out, name, "ts", *ts);
        return;
    }
    uint32_t start = flux__out_len;
    flux__begin(out);
    flux__puts(",\"name\":");
    flux__put_json_str(name, flux_strlen(name));
    flux__puts(",\"value\":");
    switch (value.type) {
    case FLUX_F64: flux__put(b, flux_format_f64(b, value.f)); break;
    case FLUX_I64: flux__put(b, flux_format_i64(b, value.i)); break;
    case FLUX_BOOL: flux__puts(value.i ? "true" : "false"); break;
    case FLUX_STR: flux__put_json_str(value.s, value.s_len); break;
    }
    if (unit && unit[0]) {
        flux__puts(",\"unit\":");
        flux__put_json_str(unit, flux_strlen(unit));
    }
    if (quality == FLUX_STALE) flux__puts(",\"quality\":\"stale\"");
    if (quality == FLUX_BAD) flux__puts(",\"quality\":\"bad\"");
    if (device) {
        flux__puts(",\"device\":");
        flux__put_json_str(device, flux_strlen(device));
    }
    if (ts) {
        flux__puts(",\"ts\":");
        flux__put(b, flux_format_f64(b, *ts));
    }
    flux__puts("}\n");
    if (!flux__out_oom && flux__out_len - start - 1 > FLUX_MAX_LINE) {
        flux__out_len = start;
        out->lines--;
        char m[160];
        flux_text t = flux_text_on(m, sizeof m);
        flux_text_str(&t, "measurement \"");
        flux_text_strn(&t, name, 64);
        flux_text_str(&t, "\": output line exceeds the 65536 byte limit");
        flux_out_error(out, m);
    }
}

/* ---- input batch ---------------------------------------------------------------------------- */
static uint32_t flux__u16(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
static uint32_t flux__u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* Fills m from one message body; returns 0 or a static reason. */
static const char *flux__parse_message(const uint8_t *p, uint32_t size, flux_msg *m) {
    uint32_t pos;
    if (size < 14) return "malformed input message: shorter than its fixed fields";
    m->kind = p[0];
    m->function = p[1];
    m->address = (uint16_t)flux__u16(p + 2);
    union { uint64_t u; double d; } ts;
    ts.u = (uint64_t)flux__u32(p + 4) | ((uint64_t)flux__u32(p + 8) << 32);
    m->ts = ts.d;
    m->device_len = flux__u16(p + 12);
    if (m->device_len > size - 14) return "malformed input message: device runs past the message";
    m->device = (const char *)p + 14;
    pos = 14 + m->device_len;
    if (pos + 2 > size) return "malformed input message: topic_len runs past the message";
    m->topic_len = flux__u16(p + pos);
    pos += 2;
    if (m->topic_len > size - pos) return "malformed input message: topic runs past the message";
    m->topic = (const char *)p + pos;
    pos += m->topic_len;
    if (pos + 4 > size) return "malformed input message: payload_len runs past the message";
    m->payload_len = flux__u32(p + pos);
    pos += 4;
    if (m->payload_len > size - pos) return "malformed input message: payload runs past the message";
    m->payload = p + pos;
    return 0;
}

FLUX_EXPORT("flux_abi_version") int32_t flux_abi_version(void) { return FLUX_ABI_VERSION; }

FLUX_EXPORT("flux_init") int32_t flux_init(const char *cfg, uint32_t len) {
    return flux_plugin_init(cfg, len);
}

FLUX_EXPORT("flux_process") int64_t flux_process(const uint8_t *in, uint32_t len) {
    flux__out_len = 0;
    flux__out_oom = 0;
    if (len < 4) {
        flux_log_error("malformed input batch: no message count");
        return -1;
    }
    uint32_t count = flux__u32(in), pos = 4;
    for (uint32_t i = 0; i < count; i++) {
        if (len - pos < 4) {
            flux_log_error("malformed input batch: a message size runs past the batch");
            return -1;
        }
        uint32_t size = flux__u32(in + pos);
        pos += 4;
        if (size > len - pos) {
            flux_log_error("malformed input batch: a message runs past the batch");
            return -1;
        }
        flux_msg m;
        flux_out out;
        m.index = i;
        out.index = i;
        out.lines = 0;
        const char *bad = flux__parse_message(in + pos, size, &m);
        if (bad) flux_out_error(&out, bad);
        else flux_plugin_process(&m, &out);
        pos += size;
    }
    if (flux__out_oom) {
        flux_log_error("out of memory for the output of this batch");
        return -1;
    }
    if (!flux__out_len) return 0;
    return (int64_t)(((uint64_t)(uintptr_t)flux__out << 32) | flux__out_len);
}

/* ---- config lookups ------------------------------------------------------------------------- */
typedef struct { const char *p, *end; } flux__json;

static void flux__ws(flux__json *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\n' || *j->p == '\r' || *j->p == '\t')) j->p++;
}

/* Skips one string (j->p at its opening quote). */
static int flux__skip_string(flux__json *j) {
    j->p++;
    while (j->p < j->end) {
        char c = *j->p++;
        if (c == '"') return 1;
        if (c == '\\') {
            if (j->p >= j->end) return 0;
            j->p++;
        }
    }
    return 0;
}

static int flux__skip_value(flux__json *j, int depth) {
    flux__ws(j);
    if (j->p >= j->end || depth > 64) return 0;
    char c = *j->p;
    if (c == '"') return flux__skip_string(j);
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        j->p++;
        flux__ws(j);
        if (j->p < j->end && *j->p == close) { j->p++; return 1; }
        for (;;) {
            if (c == '{') {
                flux__ws(j);
                if (j->p >= j->end || *j->p != '"' || !flux__skip_string(j)) return 0;
                flux__ws(j);
                if (j->p >= j->end || *j->p != ':') return 0;
                j->p++;
            }
            if (!flux__skip_value(j, depth + 1)) return 0;
            flux__ws(j);
            if (j->p >= j->end) return 0;
            if (*j->p == ',') { j->p++; continue; }
            if (*j->p == close) { j->p++; return 1; }
            return 0;
        }
    }
    /* number or literal */
    const char *start = j->p;
    while (j->p < j->end && *j->p != ',' && *j->p != '}' && *j->p != ']' && *j->p != ' ' &&
           *j->p != '\n' && *j->p != '\r' && *j->p != '\t')
        j->p++;
    return j->p > start;
}

/* Finds the value at a dotted path; j->p is left at the value. */
static int flux__find(const char *cfg, uint32_t len, const char *path, flux__json *j) {
    j->p = cfg;
    j->end = cfg + len;
    while (*path) {
        const char *seg = path;
        uint32_t seg_len = 0;
        while (path[seg_len] && path[seg_len] != '.') seg_len++;
        path += seg_len + (path[seg_len] == '.');
        flux__ws(j);
        if (j->p >= j->end || *j->p != '{') return 0;
        j->p++;
        int found = 0;
        for (;;) {
            flux__ws(j);
            if (j->p < j->end && *j->p == '}') return 0;
            if (j->p >= j->end || *j->p != '"') return 0;
            const char *key = j->p + 1;
            if (!flux__skip_string(j)) return 0;
            uint32_t key_len = (uint32_t)(j->p - 1 - key);
            flux__ws(j);
            if (j->p >= j->end || *j->p != ':') return 0;
            j->p++;
            flux__ws(j);
            if (key_len == seg_len) {
                uint32_t k = 0;
                while (k < seg_len && key[k] == seg[k]) k++;
                if (k == seg_len) { found = 1; break; }
            }
            if (!flux__skip_value(j, 0)) return 0;
            flux__ws(j);
            if (j->p < j->end && *j->p == ',') j->p++;
        }
        if (!found) return 0;
    }
    flux__ws(j);
    return j->p < j->end;
}

int flux_cfg_has(const char *cfg, uint32_t len, const char *path) {
    flux__json j;
    return flux__find(cfg, len, path, &j) && !(j.end - j.p >= 4 && j.p[0] == 'n' && j.p[1] == 'u');
}

int flux_cfg_number(const char *cfg, uint32_t len, const char *path, double *out) {
    flux__json j;
    if (!flux__find(cfg, len, path, &j)) return 0;
    const char *p = j.p;
    int neg = 0, exp = 0, exp_neg = 0, dropped = 0;
    uint64_t mant = 0;
    if (p < j.end && *p == '-') { neg = 1; p++; }
    if (p >= j.end || *p < '0' || *p > '9') return 0;
    while (p < j.end && *p >= '0' && *p <= '9') {
        if (mant < 100000000000000000ull) mant = mant * 10 + (uint64_t)(*p - '0');
        else dropped++;
        p++;
    }
    int frac = 0;
    if (p < j.end && *p == '.') {
        p++;
        if (p >= j.end || *p < '0' || *p > '9') return 0;
        while (p < j.end && *p >= '0' && *p <= '9') {
            if (mant < 100000000000000000ull) { mant = mant * 10 + (uint64_t)(*p - '0'); frac++; }
            p++;
        }
    }
    if (p < j.end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < j.end && (*p == '+' || *p == '-')) exp_neg = *p++ == '-';
        if (p >= j.end || *p < '0' || *p > '9') return 0;
        while (p < j.end && *p >= '0' && *p <= '9') {
            if (exp < 10000) exp = exp * 10 + (*p - '0');
            p++;
        }
    }
    int e10 = (exp_neg ? -exp : exp) + dropped - frac;
    double v = (double)mant;
    if (e10 < -330) v = 0;
    else if (e10 > 330) v = 1e308 * 10;
    else v = flux__scale10(v, e10);
    *out = neg ? -v : v;
    return 1;
}

int flux_cfg_bool(const char *cfg, uint32_t len, const char *path, int *out) {
    flux__json j;
    if (!flux__find(cfg, len, path, &j)) return 0;
    if (j.end - j.p >= 4 && j.p[0] == 't' && j.p[1] == 'r' && j.p[2] == 'u' && j.p[3] == 'e') { *out = 1; return 1; }
    if (j.end - j.p >= 5 && j.p[0] == 'f' && j.p[1] == 'a' && j.p[2] == 'l' && j.p[3] == 's' && j.p[4] == 'e') { *out = 0; return 1; }
    return 0;
}

static int flux__hex4(const char *p, uint32_t *out) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (uint32_t)(c - 'A' + 10);
        else return 0;
    }
    *out = v;
    return 1;
}

int32_t flux_cfg_string(const char *cfg, uint32_t len, const char *path, char *dst, uint32_t cap) {
    flux__json j;
    if (!flux__find(cfg, len, path, &j) || *j.p != '"') return -1;
    const char *p = j.p + 1;
    char tmp[4];
    uint32_t n = 0;
#define FLUX__OUT(ch) do { if (n + 1 < cap) dst[n] = (ch); n++; } while (0)
    while (p < j.end && *p != '"') {
        char c = *p++;
        if (c != '\\') { FLUX__OUT(c); continue; }
        if (p >= j.end) return -1;
        c = *p++;
        switch (c) {
        case 'n': FLUX__OUT('\n'); break;
        case 'r': FLUX__OUT('\r'); break;
        case 't': FLUX__OUT('\t'); break;
        case 'b': FLUX__OUT('\b'); break;
        case 'f': FLUX__OUT('\f'); break;
        case 'u': {
            uint32_t cp, lo;
            if (j.end - p < 4 || !flux__hex4(p, &cp)) return -1;
            p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF && j.end - p >= 6 && p[0] == '\\' && p[1] == 'u' &&
                flux__hex4(p + 2, &lo) && lo >= 0xDC00 && lo <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            } else if (cp >= 0xD800 && cp <= 0xDFFF) {
                cp = 0xFFFD;
            }
            uint32_t k = 0;
            if (cp < 0x80) tmp[k++] = (char)cp;
            else if (cp < 0x800) { tmp[k++] = (char)(0xC0 | (cp >> 6)); tmp[k++] = (char)(0x80 | (cp & 0x3F)); }
            else if (cp < 0x10000) {
                tmp[k++] = (char)(0xE0 | (cp >> 12)); tmp[k++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                tmp[k++] = (char)(0x80 | (cp & 0x3F));
            } else {
                tmp[k++] = (char)(0xF0 | (cp >> 18)); tmp[k++] = (char)(0x80 | ((cp >> 12) & 0x3F));
                tmp[k++] = (char)(0x80 | ((cp >> 6) & 0x3F)); tmp[k++] = (char)(0x80 | (cp & 0x3F));
            }
            for (uint32_t i = 0; i < k; i++) FLUX__OUT(tmp[i]);
            break;
        }
        default: FLUX__OUT(c); break; /* \" \\ \/ */
        }
    }
#undef FLUX__OUT
    if (p >= j.end) return -1;
    if (cap) dst[n < cap ? n : cap - 1] = 0;
    return (int32_t)n;
}

#endif /* FLUX_PLUGIN_DECLARATIONS_ONLY */
#endif /* FLUX_PLUGIN_H */
