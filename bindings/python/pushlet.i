/* SWIG interface for the Pushlet C API: the private extension module `pushlet._pushlet`.
 *
 * Python code should use the `pushlet` package (pushlet/__init__.py), which gives the idiomatic
 * API on top of this one. What this layer decides:
 * - No C callback ever calls Python: pushlet_set_event_handler() and pushlet_set_logger() are not
 *   wrapped; hooks and log records come through the pull queue (pushlet_event_fd/next), drained
 *   by a Python thread or an asyncio loop.
 * - The GIL is released around the calls that may wait (start, stop, free, distributed mode):
 *   stop joins the loop thread, and other Python threads keep running meanwhile. Calls that
 *   never wait (publish, send, allow/deny, stats) keep it: releasing costs more than the call.
 * - Strings go in as str (UTF-8, no copy) or bytes; message data also as any bytes-like object.
 *   Names (topic, event, user id, ...) may not contain NUL. Event strings come out as bytes with
 *   their exact length; the Python layer decodes them.
 * - pushlet_new() returns (code, handle); pushlet_metrics() returns the text as str.
 */
%module(threads="1") _pushlet_swig

%begin %{
#define PY_SSIZE_T_CLEAN /* before Python.h, which SWIG's runtime includes first */
%}

%{
#include <Python.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "pushlet.h"
%}

/* Release the GIL only where stated below. */
%nothread;

/* ---- Input strings ------------------------------------------------------------------------- */

%{
/* A NUL-free C string from str (its cached UTF-8, no copy) or bytes; None gives NULL. The
 * pointer borrows from `obj`, which outlives the call. Returns 0, or -1 with an exception set. */
static int pl_py_cstr(PyObject *obj, const char **out, const char *what)
{
    Py_ssize_t n;
    const char *s;
    if (obj == Py_None) {
        *out = NULL;
        return 0;
    }
    if (PyUnicode_Check(obj)) {
        s = PyUnicode_AsUTF8AndSize(obj, &n);
        if (!s)
            return -1;
    } else if (PyBytes_Check(obj)) {
        s = PyBytes_AS_STRING(obj);
        n = PyBytes_GET_SIZE(obj);
    } else {
        PyErr_Format(PyExc_TypeError, "%s must be str or bytes, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if ((size_t)n != strlen(s)) {
        PyErr_Format(PyExc_ValueError, "%s must not contain NUL characters", what);
        return -1;
    }
    *out = s;
    return 0;
}
%}

%typemap(in) const char * {
    if (pl_py_cstr($input, (const char **)&$1, "$1_name") < 0)
        SWIG_fail;
}
%typemap(freearg) const char * "" /* borrowed: nothing to free */
%typemap(typecheck, precedence=SWIG_TYPECHECK_STRING) const char * {
    $1 = $input == Py_None || PyUnicode_Check($input) || PyBytes_Check($input);
}

/* Message data: str (UTF-8), bytes or any contiguous buffer (bytearray, memoryview, ...). */
%typemap(in) (const char *data, size_t len) (Py_buffer view, int have_view = 0) {
    if (PyUnicode_Check($input)) {
        Py_ssize_t n;
        $1 = (char *)PyUnicode_AsUTF8AndSize($input, &n);
        if (!$1)
            SWIG_fail;
        $2 = (size_t)n;
    } else if (PyBytes_Check($input)) {
        $1 = PyBytes_AS_STRING($input);
        $2 = (size_t)PyBytes_GET_SIZE($input);
    } else {
        if (PyObject_GetBuffer($input, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Format(PyExc_TypeError, "data must be str or bytes-like, not %.100s",
                         Py_TYPE($input)->tp_name);
            SWIG_fail;
        }
        have_view = 1;
        $1 = (char *)view.buf;
        $2 = (size_t)view.len;
    }
}
%typemap(freearg) (const char *data, size_t len) {
    if (have_view$argnum)
        PyBuffer_Release(&view$argnum);
}

/* ---- Output strings ------------------------------------------------------------------------ */

/* Event accessors returning (const char *, size_t *len): bytes of exactly that length. */
%typemap(in, numinputs=0) size_t *len (size_t tmp = 0) { $1 = &tmp; }
%typemap(argout) size_t *len {
    Py_XDECREF($result);
    if (result)
        $result = PyBytes_FromStringAndSize(result, (Py_ssize_t)*$1);
    else
        $result = (Py_INCREF(Py_None), Py_None);
}

/* The other const char * results (strerror, method, remote, component, version): str. */
%typemap(out) const char * {
    $result = $1 ? PyUnicode_DecodeUTF8($1, (Py_ssize_t)strlen($1), "surrogateescape")
                 : (Py_INCREF(Py_None), Py_None);
}

/* pushlet_new(&out): returns [code, handle]. */
%typemap(in, numinputs=0) pushlet_t **out (pushlet_t *tmp = NULL) { $1 = &tmp; }
%typemap(argout) pushlet_t **out {
    $result = SWIG_Python_AppendOutput($result, SWIG_NewPointerObj(*$1, $*1_descriptor, 0));
}

/* pushlet_event_header_at(e, i, &name, &value): [found, name, value] as bytes. */
%typemap(in, numinputs=0) const char **name (const char *tmp = NULL) { $1 = ($1_ltype)&tmp; }
%typemap(in, numinputs=0) const char **value (const char *tmp = NULL) { $1 = ($1_ltype)&tmp; }
%typemap(argout) const char **name, const char **value {
    PyObject *o = *$1 ? PyBytes_FromString(*$1) : (Py_INCREF(Py_None), Py_None);
    $result = SWIG_Python_AppendOutput($result, o);
}

/* ---- What is wrapped ----------------------------------------------------------------------- */

/* Callbacks would run on the broker's thread: hosts like Python use the pull queue instead. */
%ignore pushlet_set_event_handler;
%ignore pushlet_set_logger;
%ignore pushlet_event_fn;
%ignore pushlet_log_fn;
/* Wrapped below with a sized buffer. */
%ignore pushlet_metrics;

/* Calls that may wait: the GIL is released around them. */
%thread pushlet_start;
%thread pushlet_stop;
%thread pushlet_free;
%thread pushlet_enable_distributed_mode;

%include <stdint.i>
#define PUSHLET_EXTERN
%include "pushlet.h"

%inline %{
/** Every counter and gauge in the Prometheus text format, as str. */
PyObject *pushlet_py_metrics(pushlet_t *p)
{
    char stack[4096];
    int n = pushlet_metrics(p, stack, sizeof(stack));
    if (n < 0)
        return PyLong_FromLong(n);
    if ((size_t)n < sizeof(stack))
        return PyUnicode_DecodeUTF8(stack, n, "replace");
    for (;;) { /* the text can grow between the sizing call and the copy */
        size_t cap = (size_t)n + 1024;
        char *buf = malloc(cap);
        if (!buf)
            return PyErr_NoMemory();
        n = pushlet_metrics(p, buf, cap);
        if (n >= 0 && (size_t)n < cap) {
            PyObject *s = PyUnicode_DecodeUTF8(buf, n, "replace");
            free(buf);
            return s;
        }
        free(buf);
        if (n < 0)
            return PyLong_FromLong(n);
    }
}

/** Take the next pending event as one tuple (None when there is none), so draining costs one
 *  call per event: (type, connection, request, transport, level, component, text, user,
 *  metadata, topic, binary). Connection requests (AUTH_CONNECT) add (method, path, query,
 *  remote, headers), headers a tuple of (name, value) pairs. Strings are bytes. */
PyObject *pushlet_py_event_next(pushlet_t *p)
{
    pushlet_event_t *e = pushlet_event_next(p);
    if (!e)
        Py_RETURN_NONE;
    size_t ltext, luser, lmeta, ltopic;
    const char *text = pushlet_event_text(e, &ltext);
    const char *user = pushlet_event_user(e, &luser);
    const char *meta = pushlet_event_metadata(e, &lmeta);
    const char *topic = pushlet_event_topic(e, &ltopic);
    int type = pushlet_event_type(e);
    PyObject *t;
    if (type == PUSHLET_EVENT_AUTH_CONNECT) {
        size_t lpath, lquery, count = pushlet_event_header_count(e);
        const char *path = pushlet_event_path(e, &lpath);
        const char *query = pushlet_event_query(e, &lquery);
        PyObject *headers = PyTuple_New((Py_ssize_t)count);
        for (size_t i = 0; headers && i < count; i++) {
            const char *name = "", *value = "";
            pushlet_event_header_at(e, i, &name, &value);
            PyObject *pair = Py_BuildValue("(yy)", name, value);
            if (!pair) {
                Py_CLEAR(headers);
                break;
            }
            PyTuple_SET_ITEM(headers, (Py_ssize_t)i, pair);
        }
        t = !headers ? NULL
                     : Py_BuildValue("(iKKiiyy#y#y#y#iyy#y#yN)", type,
                                     (unsigned long long)pushlet_event_connection(e),
                                     (unsigned long long)pushlet_event_request(e),
                                     pushlet_event_transport(e), pushlet_event_log_level(e),
                                     pushlet_event_component(e), text, (Py_ssize_t)ltext, user,
                                     (Py_ssize_t)luser, meta, (Py_ssize_t)lmeta, topic,
                                     (Py_ssize_t)ltopic, pushlet_event_binary(e),
                                     pushlet_event_method(e), path, (Py_ssize_t)lpath, query,
                                     (Py_ssize_t)lquery, pushlet_event_remote(e), headers);
    } else {
        t = Py_BuildValue("(iKKiiyy#y#y#y#i)", type,
                          (unsigned long long)pushlet_event_connection(e),
                          (unsigned long long)pushlet_event_request(e),
                          pushlet_event_transport(e), pushlet_event_log_level(e),
                          pushlet_event_component(e), text, (Py_ssize_t)ltext, user,
                          (Py_ssize_t)luser, meta, (Py_ssize_t)lmeta, topic, (Py_ssize_t)ltopic,
                          pushlet_event_binary(e));
    }
    pushlet_event_free(e);
    return t;
}

/** For bench/python_publish.py: publish `count` times from C in one call, the GIL released,
 *  and return the nanoseconds it took (or a negative error code). The C side of the
 *  Python-versus-C comparison, made in the same process on the same broker. */
long long pushlet_py_publish_loop(pushlet_t *p, const char *topic, const char *event,
                                  const char *data, size_t len, int count)
{
    struct timespec a, b;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < count && rc == 0; i++)
        rc = pushlet_publish(p, topic, event, data, len);
    clock_gettime(CLOCK_MONOTONIC, &b);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return rc;
    return (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec);
}
%}
