import CoreML
import Foundation

/// Names fixed by the package contract (converters/coreml/export.py in ondevice-lora).
enum Contract {
    static let inputIDs = "input_ids"  // int32 (1, L)
    static let position = "position"  // int32 (1,): tokens already in the KV cache
    static let logits = "logits"  // (1, L, vocab), fp16 for int4/fp16 exports
    static let contextLengthKey = "ondevice_lora.context_length"
    static let fingerprintKey = "ondevice_lora.base_fingerprint"
}

public enum OndeviceLoRAError: LocalizedError {
    case badPackage(String)
    case contextFull(position: Int, contextLength: Int)
    case badAdapter(file: String, problem: String)

    public var errorDescription: String? {
        switch self {
        case .badPackage(let problem): return "Core ML package: \(problem)"
        case .contextFull(let position, let contextLength):
            return "The KV cache is full (\(position) of \(contextLength) positions); start a new conversation."
        case .badAdapter(let file, let problem): return "Adapter \(file): \(problem)"
        }
    }
}

/// Compiles a downloaded `.mlpackage` and keeps the result in Application Support, reused
/// until the package is newer than it.
///
/// Packages added to an Xcode target are compiled at build time: use the bundle's `.mlmodelc` instead.
public func compiledModel(for package: URL) async throws -> URL {
    let files = FileManager.default
    let folder = try files.url(for: .applicationSupportDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
    let destination = folder.appendingPathComponent(package.deletingPathExtension().lastPathComponent + ".mlmodelc")
    func modified(_ url: URL) -> Date? { try? files.attributesOfItem(atPath: url.path)[.modificationDate] as? Date }
    if let compiled = modified(destination), let source = modified(package), compiled >= source { return destination }
    if files.fileExists(atPath: destination.path) { try files.removeItem(at: destination) }
    // compileModel(at:) writes to a temporary folder the system may delete: move the result out.
    let temporary = try await MLModel.compileModel(at: package)
    try files.moveItem(at: temporary, to: destination)
    return destination
}

/// One conversation with a stateful prefill/decode pair of functions of one compiled package.
///
/// Multifunction package: `prefill_base`/`decode_base`, or `prefill_<adapter>`/`decode_<adapter>`.
/// Swappable package: `prefill`/`decode`, with the adapter tensors in `extraInputs`.
/// Predictions that share one MLState must run one after another: every stateful call goes
/// through one serial queue, so calls from several threads or tasks are safe. The MLState is
/// only valid while the MLModel that made it is alive, so the model is held beside the state
/// (`stateOwner`) for as long as the state is used, and replaced together with it.
public final class LanguageModel {
    private(set) var prefill: MLModel
    private(set) var decode: MLModel
    public let prefillLength: Int
    public let contextLength: Int
    /// The package's user-defined metadata (strings), e.g. the base fingerprint.
    public let metadata: [String: String]
    /// Inputs added to every call; the swappable package takes its adapter here.
    public var extraInputs: [String: MLMultiArray] = [:]
    /// Number of tokens in the KV cache, the `position` of the next call.
    public private(set) var position = 0
    private var state: MLState
    /// The model that made `state`: kept alive as long as the state is used.
    private var stateOwner: MLModel
    /// One serial queue for every call that reads or writes `state`.
    private let queue = DispatchQueue(label: "ondevice-lora.language-model")

    public init(compiledModel url: URL, prefillFunction: String, decodeFunction: String) async throws {
        let prefill = try await LanguageModel.load(function: prefillFunction, from: url)
        let metadata = prefill.modelDescription.metadata[.creatorDefinedKey] as? [String: String] ?? [:]
        // The prefill chunk length is the fixed second dimension of the prefill input_ids.
        let shape = prefill.modelDescription.inputDescriptionsByName[Contract.inputIDs]?.multiArrayConstraint?.shape
        guard let shape, shape.count == 2 else {
            throw OndeviceLoRAError.badPackage("function \(prefillFunction) has no (1, L) input \(Contract.inputIDs)")
        }
        guard let context = metadata[Contract.contextLengthKey].flatMap({ Int($0) }) else {
            throw OndeviceLoRAError.badPackage("metadata \(Contract.contextLengthKey) is missing")
        }
        self.prefill = prefill
        self.decode = try await LanguageModel.load(function: decodeFunction, from: url)
        self.metadata = metadata
        prefillLength = shape[1].intValue
        contextLength = context
        // Both functions declare the same key_cache/value_cache states, so one MLState serves both.
        state = prefill.makeState()
        stateOwner = prefill
    }

    /// Switches to another adapter's function pair of the same package (multifunction). The KV
    /// cache was computed with the old adapter, so the conversation starts over with a fresh
    /// state made by the new functions (never reuse the old state with them).
    public func switchFunctions(compiledModel url: URL, prefillFunction: String, decodeFunction: String) async throws {
        let newPrefill = try await LanguageModel.load(function: prefillFunction, from: url)
        let newDecode = try await LanguageModel.load(function: decodeFunction, from: url)
        queue.sync {
            prefill = newPrefill
            decode = newDecode
            state = newPrefill.makeState()
            stateOwner = newPrefill
            position = 0
        }
    }

    static func load(function: String, from url: URL) async throws -> MLModel {
        let configuration = MLModelConfiguration()
        configuration.functionName = function
        return try await MLModel.load(contentsOf: url, configuration: configuration)
    }

    /// The input descriptions of the decode function (the swappable package's lora_* inputs among them).
    public var inputDescriptions: [String: MLFeatureDescription] {
        decode.modelDescription.inputDescriptionsByName
    }

    /// Starts a new conversation: zeroed KV cache, position 0.
    public func reset() {
        queue.sync {
            state = prefill.makeState()
            stateOwner = prefill
            position = 0
        }
    }

    /// Feeds `tokens` after what the cache holds and returns the greedy next token.
    ///
    /// Full prefill chunks go through `prefill`; the last chunk is padded with id 0 (padded
    /// positions write cache slots that later calls overwrite before any query sees them).
    /// A single token, or a chunk whose padding would run past the context, goes through `decode`.
    public func append(_ tokens: [Int]) throws -> Int {
        precondition(!tokens.isEmpty, "append needs at least one token")
        return try queue.sync { try appendOnQueue(tokens) }
    }

    private func appendOnQueue(_ tokens: [Int]) throws -> Int {
        dispatchPrecondition(condition: .onQueue(queue))
        var next = 0
        var start = 0
        while start < tokens.count {
            let remaining = tokens.count - start
            if remaining > 1 && position + prefillLength <= contextLength {
                let chunk = Array(tokens[start..<start + min(remaining, prefillLength)])
                next = try run(prefill, chunk, length: prefillLength)
                start += chunk.count
            } else {
                next = try run(decode, [tokens[start]], length: 1)
                start += 1
            }
        }
        return next
    }

    /// One prediction: `tokens` padded to `length`, written at `position`; returns the argmax
    /// of the logits of the last real token.
    private func run(_ model: MLModel, _ tokens: [Int], length: Int) throws -> Int {
        guard position + tokens.count <= contextLength else {
            throw OndeviceLoRAError.contextFull(position: position, contextLength: contextLength)
        }
        let ids = try MLMultiArray(shape: [1, NSNumber(value: length)], dataType: .int32)
        ids.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, strides in
            for i in 0..<length { buffer[i * strides[1]] = i < tokens.count ? Int32(tokens[i]) : 0 }
        }
        let pos = try MLMultiArray(shape: [1], dataType: .int32)
        pos.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, _ in buffer[0] = Int32(position) }

        var features: [String: MLFeatureValue] = [
            Contract.inputIDs: MLFeatureValue(multiArray: ids),
            Contract.position: MLFeatureValue(multiArray: pos),
        ]
        for (name, array) in extraInputs { features[name] = MLFeatureValue(multiArray: array) }
        // `state` was made by `stateOwner`, alive as long as this object holds both.
        let output = try model.prediction(from: MLDictionaryFeatureProvider(dictionary: features), using: state)
        guard let logits = output.featureValue(for: Contract.logits)?.multiArrayValue else {
            throw OndeviceLoRAError.badPackage("no \(Contract.logits) output")
        }
        position += tokens.count
        return try argmax(logits, row: tokens.count - 1)
    }
}

/// Greedy choice over logits (1, L, vocab) at query `row`, reading fp16 or fp32 in place.
func argmax(_ logits: MLMultiArray, row: Int) throws -> Int {
    let strides = logits.strides.map(\.intValue)
    let vocab = logits.shape[2].intValue
    let start = row * strides[1]
    func best<T: BinaryFloatingPoint>(_ values: UnsafeBufferPointer<T>) -> Int {
        var index = 0
        for j in 1..<vocab where values[start + j * strides[2]] > values[start + index * strides[2]] {
            index = j
        }
        return index
    }
    switch logits.dataType {
    case .float16: return logits.withUnsafeBufferPointer(ofType: Float16.self) { best($0) }
    case .float32: return logits.withUnsafeBufferPointer(ofType: Float.self) { best($0) }
    default: throw OndeviceLoRAError.badPackage("logits have data type \(logits.dataType.rawValue)")
    }
}
