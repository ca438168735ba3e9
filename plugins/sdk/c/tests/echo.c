/*
 * Test fixture for the C SDK (built by tests/integration/test_plugin_golden.py):
 * echoes its input back through the SDK's formatters, escaper and config lookups.
 *   topic "f64": payload = little-endian doubles -> one measurement "v" each
 *   topic "i64": payload = little-endian int64s  -> one measurement "v" each
 *   topic "str": payload = bytes                  -> measurement "s" with the bytes as a string
 *   topic "err": payload = bytes (NUL-free)       -> an error line with the bytes as message
 *   topic "cfg": lookups of the init config: "num" (number), "text" (string), "flag" (bool),
 *                "nested.deep.x" (number), each echoed when present
 */
#include "flux_plugin.h"

static char config[4096];
static uint32_t config_len;

int flux_plugin_init(const char *cfg, uint32_t len) {
    if (len > sizeof config) {
        flux_log_error("echo: config too long");
        return 1;
    }
    memcpy(config, cfg, len);
    config_len = len;
    return 0;
}

static int topic_is(const flux_msg *m, const char *t) {
    uint32_t n = flux_strlen(t);
    if (m->topic_len != n) return 0;
    for (uint32_t i = 0; i < n; i++)
        if (m->topic[i] != t[i]) return 0;
    return 1;
}

static uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

void flux_plugin_process(const flux_msg *m, flux_out *out) {
    if (topic_is(m, "f64") || topic_is(m, "i64")) {
        int is_f = topic_is(m, "f64");
        for (uint32_t i = 0; i + 8 <= m->payload_len; i += 8) {
            union { uint64_t u; double d; int64_t s; } v;
            v.u = le64(m->payload + i);
            if (is_f) flux_out_f64(out, "v", v.d, "");
            else flux_out_i64(out, "v", v.s, "");
        }
    } else if (topic_is(m, "str")) {
        flux_out_measurement_ex(out, "s", flux_strn((const char *)m->payload, m->payload_len), "",
                                FLUX_BAD, "dev\"ice", &m->ts);
    } else if (topic_is(m, "err")) {
        char *buf = flux_alloc(m->payload_len + 1);
        memcpy(buf, m->payload, m->payload_len);
        buf[m->payload_len] = 0;
        flux_out_error(out, buf);
        flux_dealloc(buf, m->payload_len + 1);
    } else if (topic_is(m, "cfg")) {
        double d;
        int b;
        char s[64];
        if (flux_cfg_number(config, config_len, "num", &d)) flux_out_f64(out, "num", d, "");
        if (flux_cfg_string(config, config_len, "text", s, sizeof s) >= 0) flux_out_str(out, "text", s);
        if (flux_cfg_bool(config, config_len, "flag", &b)) flux_out_bool(out, "flag", b);
        if (flux_cfg_number(config, config_len, "nested.deep.x", &d)) flux_out_f64(out, "x", d, "");
        flux_out_bool(out, "has_missing", flux_cfg_has(config, config_len, "missing"));
    } else {
        flux_out_error(out, "echo: unknown topic");
    }
}
