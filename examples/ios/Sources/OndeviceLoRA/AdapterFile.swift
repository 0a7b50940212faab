import CoreML
import Foundation

/// A `<name>.coreml-adapter.safetensors` file (`ondevice-lora export adapter`), memory-mapped.
///
/// Every tensor is named like an input of the swappable package (`lora_a_q_proj`, ...,
/// `lora_scale`), fp16, row-major, already zero-padded to the package's r_max, so each becomes an
/// MLMultiArray over the mapped bytes: nothing is copied and pages load as Core ML reads them.
public struct AdapterFile {
    public let url: URL
    /// The safetensors `__metadata__`: format, format_version, base_fingerprint, rank, r_max, ...
    public let manifest: [String: String]
    public let tensors: [String: MLMultiArray]

    public init(contentsOf url: URL) throws {
        self.url = url
        func fail(_ problem: String) -> OndeviceLoRAError {
            .badAdapter(file: url.lastPathComponent, problem: problem)
        }
        // NSData rather than Data: its `bytes` pointer stays valid for the object's lifetime,
        // which the arrays below extend by holding it in their deallocators.
        let file = try NSData(contentsOf: url, options: .alwaysMapped)
        guard file.length >= 8 else { throw fail("shorter than the 8-byte header length") }
        let base = file.bytes
        // safetensors layout: u64 little-endian header length N, N bytes of JSON, then the data.
        var headerLength = 0
        for i in 0..<8 { headerLength |= Int(base.load(fromByteOffset: i, as: UInt8.self)) << (8 * i) }
        guard headerLength > 0, 8 + headerLength <= file.length else {
            throw fail("header length \(headerLength) does not fit in \(file.length) bytes")
        }
        let headerJSON = try JSONSerialization.jsonObject(with: Data(bytes: base + 8, count: headerLength))
        guard var header = headerJSON as? [String: Any] else { throw fail("header is not a JSON object") }

        manifest = header.removeValue(forKey: "__metadata__") as? [String: String] ?? [:]
        guard manifest["format"] == "ondevice-lora-coreml-adapter", manifest["format_version"] == "1" else {
            throw fail("not an ondevice-lora Core ML adapter (format \(manifest["format"] ?? "none"), "
                + "version \(manifest["format_version"] ?? "none")); write it with `ondevice-lora export adapter`")
        }

        let dataStart = 8 + headerLength
        var tensors: [String: MLMultiArray] = [:]
        for (name, value) in header {
            guard let entry = value as? [String: Any], let dtype = entry["dtype"] as? String,
                let shape = entry["shape"] as? [Int], let offsets = entry["data_offsets"] as? [Int],
                offsets.count == 2
            else { throw fail("tensor \(name) has a malformed header entry") }
            guard dtype == "F16" else { throw fail("tensor \(name) is \(dtype), expected F16") }
            let bytes = shape.reduce(1, *) * 2
            guard offsets[1] - offsets[0] == bytes, dataStart + offsets[1] <= file.length else {
                throw fail("tensor \(name) bytes \(offsets) do not match shape \(shape) or run past the file end")
            }
            let pointer = UnsafeMutableRawPointer(mutating: base + dataStart + offsets[0])
            guard Int(bitPattern: pointer) % 2 == 0 else {
                throw fail("tensor \(name) starts at an odd address: the header must be padded to a multiple of 8 bytes")
            }
            // Row-major strides in elements: the last dimension is contiguous.
            var strides = [Int](repeating: 1, count: shape.count)
            for d in stride(from: shape.count - 2, through: 0, by: -1) { strides[d] = strides[d + 1] * shape[d + 1] }
            // Core ML only reads inputs; the mapping is read-only and must never be written.
            tensors[name] = try MLMultiArray(
                dataPointer: pointer, shape: shape.map { NSNumber(value: $0) }, dataType: .float16,
                strides: strides.map { NSNumber(value: $0) }, deallocator: { _ in withExtendedLifetime(file) {} })
        }
        self.tensors = tensors
    }

    /// The package inputs for this adapter, with `lora_scale` replaced when `scale` is given
    /// (0 gives the base model). Checks names, shapes and base fingerprint against the package.
    public func inputs(for model: LanguageModel, scale: Float? = nil) throws -> [String: MLMultiArray] {
        func fail(_ problem: String) -> OndeviceLoRAError {
            .badAdapter(file: url.lastPathComponent, problem: problem)
        }
        if let packageFingerprint = model.metadata[Contract.fingerprintKey],
            let adapterFingerprint = manifest["base_fingerprint"],
            fingerprintHash(packageFingerprint) != fingerprintHash(adapterFingerprint)
        {
            throw fail("trained on another base (fingerprint \(fingerprintHash(adapterFingerprint)), "
                + "package \(fingerprintHash(packageFingerprint)))")
        }
        let wanted = model.inputDescriptions.filter { $0.key.hasPrefix("lora_") }
        for name in tensors.keys where wanted[name] == nil {
            throw fail("tensor \(name) is not an input of this package (targets: \(wanted.keys.sorted()))")
        }
        for (name, description) in wanted {
            guard let tensor = tensors[name] else { throw fail("tensor \(name) is missing") }
            let expected = description.multiArrayConstraint?.shape ?? []
            guard tensor.shape == expected else {
                throw fail("tensor \(name) has shape \(tensor.shape), the package expects \(expected)")
            }
        }
        guard let scale else { return tensors }
        var inputs = tensors
        inputs["lora_scale"] = try halfArray(shape: [1], filledWith: Float16(scale))
        return inputs
    }
}

/// Inputs that make the swappable package compute its base model: zero A/B and scale 0.
public func baseInputs(for model: LanguageModel) throws -> [String: MLMultiArray] {
    var inputs: [String: MLMultiArray] = [:]
    for (name, description) in model.inputDescriptions where name.hasPrefix("lora_") {
        inputs[name] = try halfArray(shape: description.multiArrayConstraint?.shape ?? [1], filledWith: 0)
    }
    return inputs
}

func halfArray(shape: [NSNumber], filledWith value: Float16) throws -> MLMultiArray {
    let array = try MLMultiArray(shape: shape, dataType: .float16)
    array.withUnsafeMutableBufferPointer(ofType: Float16.self) { buffer, _ in buffer.update(repeating: value) }
    return array
}

/// The package stores base_fingerprint() as JSON; compare its "fingerprint" hash, or the raw text.
func fingerprintHash(_ text: String) -> String {
    guard let data = text.data(using: .utf8),
        let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
        let hash = object["fingerprint"] as? String
    else { return text }
    return hash
}
