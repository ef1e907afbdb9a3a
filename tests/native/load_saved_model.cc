// Loads a SavedModel the way tensorflow_model_server does and runs one signature on image files.
//
//   load_saved_model EXPORT_DIR SIGNATURE IMAGE_FILE...
//
// The C++ SavedModel loader (through TensorFlow's C API), tag "serve", XLA JIT compilation
// disabled as the server disables it by default. Reads the signature's tensor names from the
// MetaGraphDef, feeds the files' bytes as a string tensor [N] to its single input and prints
// every output as one JSON object on stdout. Before running, audits the op types of the graph
// and of its whole function library: Python ops (PyFunc, EagerPyFunc), XLA ops, functions
// marked _XlaMustCompile and op types TensorFlow does not register are what a server cannot
// run. Exit codes: 0 ok, 1 usage or I/O error, 2 audit failed, 3 TensorFlow error (the status
// code and message are printed on stderr, e.g. INVALID_ARGUMENT for bytes that are not an image).
// With LOAD_SAVED_MODEL_REPEAT=N in the environment it then runs the signature N times more and
// prints "timing: runs=N p50_ms=... p99_ms=..." on stderr (benchmarks/gpu.py reads it).
//
// The MetaGraphDef is read with a minimal protobuf wire-format reader rather than the generated
// protobuf classes: the C API is the wheel's stable interface, its protobuf headers are not.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "tensorflow/c/c_api.h"
#include "tensorflow/c/tf_tstring.h"

namespace tensorflow {
void DisableXlaCompilation();  // tensorflow/compiler/jit/flags.h; exported by libtensorflow_cc
}

namespace {

// ---- protobuf wire format: just enough to walk nested messages -------------------------------

struct Field {
  uint32_t number;
  uint32_t wire_type;
  uint64_t varint;      // wire type 0
  std::string bytes;    // wire type 2 (strings and nested messages)
};

bool ReadVarint(const std::string& buf, size_t* pos, uint64_t* out) {
  uint64_t value = 0;
  for (int shift = 0; shift < 64 && *pos < buf.size(); shift += 7) {
    uint8_t byte = static_cast<uint8_t>(buf[(*pos)++]);
    value |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if (!(byte & 0x80)) {
      *out = value;
      return true;
    }
  }
  return false;
}

// All top-level fields of a serialized message, in order. Exits on malformed input.
std::vector<Field> Parse(const std::string& buf) {
  std::vector<Field> fields;
  size_t pos = 0;
  while (pos < buf.size()) {
    uint64_t key;
    Field f{};
    if (!ReadVarint(buf, &pos, &key)) break;
    f.number = static_cast<uint32_t>(key >> 3);
    f.wire_type = static_cast<uint32_t>(key & 7);
    bool ok = true;
    switch (f.wire_type) {
      case 0: ok = ReadVarint(buf, &pos, &f.varint); break;
      case 1: pos += 8; break;
      case 5: pos += 4; break;
      case 2: {
        uint64_t len;
        ok = ReadVarint(buf, &pos, &len) && pos + len <= buf.size();
        if (ok) f.bytes = buf.substr(pos, len);
        pos += len;
        break;
      }
      default: ok = false;
    }
    if (!ok || pos > buf.size()) {
      std::fprintf(stderr, "malformed MetaGraphDef\n");
      std::exit(1);
    }
    fields.push_back(std::move(f));
  }
  return fields;
}

std::vector<std::string> Repeated(const std::string& msg, uint32_t number) {
  std::vector<std::string> out;
  for (const Field& f : Parse(msg))
    if (f.number == number && f.wire_type == 2) out.push_back(f.bytes);
  return out;
}

std::string Single(const std::string& msg, uint32_t number) {
  std::vector<std::string> all = Repeated(msg, number);
  return all.empty() ? std::string() : all.back();
}

// A protobuf map<string, V> field: entries are messages with key = 1 and value = 2.
std::map<std::string, std::string> Map(const std::string& msg, uint32_t number) {
  std::map<std::string, std::string> out;
  for (const std::string& entry : Repeated(msg, number)) out[Single(entry, 1)] = Single(entry, 2);
  return out;
}

// Field numbers from tensorflow/core/protobuf/meta_graph.proto, graph.proto, node_def.proto,
// function.proto and op_def.proto.
constexpr uint32_t kMetaGraphGraphDef = 2, kMetaGraphSignatureDef = 5;
constexpr uint32_t kSignatureInputs = 1, kSignatureOutputs = 2, kTensorInfoName = 1;
constexpr uint32_t kGraphNode = 1, kGraphLibrary = 2, kNodeOp = 2;
constexpr uint32_t kLibraryFunction = 1, kFunctionSignature = 1, kFunctionNodeDef = 3,
                   kFunctionAttr = 5, kOpDefName = 1, kOpListOp = 1;

// ---- the audit -----------------------------------------------------------------------------

int Audit(const std::string& meta_graph) {
  TF_Buffer* op_list = TF_GetAllOpList();
  std::set<std::string> registered;
  for (const std::string& op : Repeated(
           std::string(static_cast<const char*>(op_list->data), op_list->length), kOpListOp))
    registered.insert(Single(op, kOpDefName));
  TF_DeleteBuffer(op_list);

  std::string graph = Single(meta_graph, kMetaGraphGraphDef);
  std::set<std::string> op_types, functions;
  std::vector<std::string> problems;
  for (const std::string& node : Repeated(graph, kGraphNode)) op_types.insert(Single(node, kNodeOp));
  for (const std::string& fn : Repeated(Single(graph, kGraphLibrary), kLibraryFunction)) {
    std::string name = Single(Single(fn, kFunctionSignature), kOpDefName);
    functions.insert(name);
    for (const std::string& node : Repeated(fn, kFunctionNodeDef))
      op_types.insert(Single(node, kNodeOp));
    if (Map(fn, kFunctionAttr).count("_XlaMustCompile"))
      problems.push_back("function " + name + " is marked _XlaMustCompile");
  }
  for (const std::string& op : op_types) {
    if (op == "PyFunc" || op == "PyFuncStateless" || op == "EagerPyFunc")
      problems.push_back("Python op " + op);
    else if (op.rfind("Xla", 0) == 0 || op.rfind("_Xla", 0) == 0)
      problems.push_back("XLA op " + op);
    else if (!registered.count(op) && !functions.count(op))
      problems.push_back("unregistered op " + op);
  }
  std::fprintf(stderr, "audit: %zu op types, %zu functions, %zu problem(s)\n", op_types.size(),
               functions.size(), problems.size());
  for (const std::string& p : problems) std::fprintf(stderr, "audit: %s\n", p.c_str());
  return problems.empty() ? 0 : 2;
}

// ---- running a signature ---------------------------------------------------------------------

TF_Output Resolve(TF_Graph* graph, const std::string& tensor_name) {
  size_t colon = tensor_name.rfind(':');
  std::string op = tensor_name.substr(0, colon);
  int index = colon == std::string::npos ? 0 : std::atoi(tensor_name.c_str() + colon + 1);
  TF_Operation* operation = TF_GraphOperationByName(graph, op.c_str());
  if (operation == nullptr) {
    std::fprintf(stderr, "no operation %s in the graph\n", op.c_str());
    std::exit(1);
  }
  return TF_Output{operation, index};
}

std::string JsonString(const char* data, size_t size) {
  std::ostringstream out;
  out << '"';
  for (size_t i = 0; i < size; ++i) {
    unsigned char c = static_cast<unsigned char>(data[i]);
    if (c == '"' || c == '\\') {
      out << '\\' << c;
    } else if (c < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out << escaped;
    } else {
      out << c;
    }
  }
  out << '"';
  return out.str();
}

// A tensor as nested JSON lists (float, int32, int64 and string element types).
std::string ToJson(TF_Tensor* tensor) {
  int rank = TF_NumDims(tensor);
  std::vector<int64_t> dims(rank);
  for (int i = 0; i < rank; ++i) dims[i] = TF_Dim(tensor, i);
  int64_t count = TF_TensorElementCount(tensor);
  const void* data = TF_TensorData(tensor);
  TF_DataType type = TF_TensorType(tensor);
  std::ostringstream out;
  for (int64_t i = 0; i < count; ++i) {
    // Open a bracket for every dimension whose index just became 0.
    int64_t stride = 1;
    std::string opens;
    for (int d = rank - 1; d >= 0; --d) {
      if (i % (stride * dims[d]) == 0) opens += '[';
      stride *= dims[d];
    }
    out << opens;
    char number[32];
    switch (type) {
      case TF_FLOAT:
        std::snprintf(number, sizeof number, "%.9g", static_cast<const float*>(data)[i]);
        out << number;
        break;
      case TF_INT32: out << static_cast<const int32_t*>(data)[i]; break;
      case TF_INT64: out << static_cast<const int64_t*>(data)[i]; break;
      case TF_STRING: {
        const TF_TString* s = static_cast<const TF_TString*>(data) + i;
        out << JsonString(TF_StringGetDataPointer(s), TF_StringGetSize(s));
        break;
      }
      default: out << "null";
    }
    stride = 1;
    for (int d = rank - 1; d >= 0; --d) {
      stride *= dims[d];
      if ((i + 1) % stride == 0) out << ']';
    }
    if (i + 1 < count) out << ',';
  }
  if (count == 0) out << "[]";
  return out.str();
}

bool ReadFile(const char* path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream buffer;
  buffer << in.rdbuf();
  *out = buffer.str();
  return true;
}

int Fail(TF_Status* status, const char* what) {
  std::fprintf(stderr, "%s: TensorFlow error %d: %s\n", what, TF_GetCode(status),
               TF_Message(status));
  return 3;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s EXPORT_DIR SIGNATURE IMAGE_FILE...\n", argv[0]);
    return 1;
  }
  const char* export_dir = argv[1];
  const std::string signature_name = argv[2];
  tensorflow::DisableXlaCompilation();

  TF_Status* status = TF_NewStatus();
  TF_Graph* graph = TF_NewGraph();
  TF_SessionOptions* options = TF_NewSessionOptions();
  TF_Buffer* meta = TF_NewBuffer();
  const char* tags[] = {"serve"};
  TF_Session* session =
      TF_LoadSessionFromSavedModel(options, nullptr, export_dir, tags, 1, graph, meta, status);
  if (TF_GetCode(status) != TF_OK) return Fail(status, "loading the SavedModel");
  std::string meta_graph(static_cast<const char*>(meta->data), meta->length);

  int audit = Audit(meta_graph);
  if (audit) return audit;

  std::map<std::string, std::string> signatures = Map(meta_graph, kMetaGraphSignatureDef);
  if (!signatures.count(signature_name)) {
    std::fprintf(stderr, "no signature %s\n", signature_name.c_str());
    return 1;
  }
  const std::string& signature = signatures[signature_name];
  std::map<std::string, std::string> inputs = Map(signature, kSignatureInputs);
  std::map<std::string, std::string> outputs = Map(signature, kSignatureOutputs);
  if (inputs.size() != 1) {
    std::fprintf(stderr, "signature %s has %zu inputs, expected 1\n", signature_name.c_str(),
                 inputs.size());
    return 1;
  }

  // The files' bytes as a string tensor [N].
  int64_t n = argc - 3;
  TF_Tensor* batch = TF_AllocateTensor(TF_STRING, &n, 1, n * sizeof(TF_TString));
  TF_TString* strings = static_cast<TF_TString*>(TF_TensorData(batch));
  for (int64_t i = 0; i < n; ++i) {
    std::string bytes;
    if (!ReadFile(argv[3 + i], &bytes)) {
      std::fprintf(stderr, "cannot read %s\n", argv[3 + i]);
      return 1;
    }
    TF_StringInit(&strings[i]);
    TF_StringCopy(&strings[i], bytes.data(), bytes.size());
  }

  TF_Output feed = Resolve(graph, Single(inputs.begin()->second, kTensorInfoName));
  std::vector<std::string> names;
  std::vector<TF_Output> fetches;
  for (const auto& [name, info] : outputs) {
    names.push_back(name);
    fetches.push_back(Resolve(graph, Single(info, kTensorInfoName)));
  }
  std::vector<TF_Tensor*> values(fetches.size(), nullptr);
  TF_SessionRun(session, nullptr, &feed, &batch, 1, fetches.data(), values.data(),
                static_cast<int>(fetches.size()), nullptr, 0, nullptr, status);
  if (TF_GetCode(status) != TF_OK) return Fail(status, "running the signature");

  const char* repeat = std::getenv("LOAD_SAVED_MODEL_REPEAT");
  if (repeat != nullptr && std::atoi(repeat) > 0) {
    std::vector<double> ms;
    for (int r = 0; r < std::atoi(repeat); ++r) {
      std::vector<TF_Tensor*> again(fetches.size(), nullptr);
      auto start = std::chrono::steady_clock::now();
      TF_SessionRun(session, nullptr, &feed, &batch, 1, fetches.data(), again.data(),
                    static_cast<int>(fetches.size()), nullptr, 0, nullptr, status);
      ms.push_back(std::chrono::duration<double, std::milli>(
          std::chrono::steady_clock::now() - start).count());
      if (TF_GetCode(status) != TF_OK) return Fail(status, "running the signature again");
      for (TF_Tensor* t : again) TF_DeleteTensor(t);
    }
    std::sort(ms.begin(), ms.end());
    std::fprintf(stderr, "timing: runs=%zu p50_ms=%.3f p99_ms=%.3f\n", ms.size(),
                 ms[ms.size() / 2], ms[std::min(ms.size() - 1, ms.size() * 99 / 100)]);
  }

  std::printf("{");
  for (size_t i = 0; i < names.size(); ++i) {
    std::printf("%s%s: %s", i ? ", " : "", JsonString(names[i].data(), names[i].size()).c_str(),
                ToJson(values[i]).c_str());
    TF_DeleteTensor(values[i]);
  }
  std::printf("}\n");

  TF_DeleteTensor(batch);
  TF_CloseSession(session, status);
  TF_DeleteSession(session, status);
  TF_DeleteBuffer(meta);
  TF_DeleteSessionOptions(options);
  TF_DeleteGraph(graph);
  TF_DeleteStatus(status);
  return 0;
}
